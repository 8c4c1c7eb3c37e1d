"""Stop strings over streamed text.

Text arrives in pieces, and a stop string may be split across them ("</" then "answer>"). Text that
could still turn out to be the start of a stop string is held back until it either completes a match
(it is then cut off, along with the match) or can no longer match (it is then released). So the
client never sees any part of a stop string, and the concatenated output equals the full text cut
before the earliest match.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopMatch:
    stop: str  # the stop string that matched
    text_before: str  # text to release before the match (the rest is dropped)


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(stops)
        self._pending = ""  # text not yet released: a suffix that may start a stop string
        self.matched: StopMatch | None = None

    def push(self, text: str, can_stop: bool = True) -> str | StopMatch:
        """Feed new text; returns the text safe to release now, or a StopMatch once a stop string
        completes. `can_stop=False` (before min_tokens) releases everything without matching."""
        if self.matched is not None:
            raise RuntimeError("push after a stop string matched")
        if not self.stops or not can_stop:
            released, self._pending = self._pending + text, ""
            return released
        self._pending += text
        match = self._earliest_match()
        if match is not None:
            self.matched = match
            self._pending = ""
            return match
        hold = self._longest_partial_suffix()
        cut = len(self._pending) - hold
        released, self._pending = self._pending[:cut], self._pending[cut:]
        return released

    def flush(self) -> str:
        """At the end of generation the held-back text can no longer become a match: release it."""
        released, self._pending = self._pending, ""
        return released

    def _earliest_match(self) -> StopMatch | None:
        best_at, best_stop = None, None
        for stop in self.stops:
            at = self._pending.find(stop)
            if at != -1 and (best_at is None or at < best_at):
                best_at, best_stop = at, stop
        if best_stop is None:
            return None
        return StopMatch(best_stop, self._pending[:best_at])

    def _longest_partial_suffix(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:length]):
                    longest = length
                    break
        return longest
