"""Stop strings over streamed text: matches across pieces, hold-back, cut position."""

import pytest

from router.stop_strings import StopMatch, StopStringMatcher


def _run(stops, pieces, can_stop=True):
    matcher = StopStringMatcher(stops)
    released = []
    for piece in pieces:
        out = matcher.push(piece, can_stop)
        if isinstance(out, StopMatch):
            released.append(out.text_before)
            return "".join(released), out.stop
        released.append(out)
    released.append(matcher.flush())
    return "".join(released), None


@pytest.mark.parametrize("pieces", [["Hello</answer>tail"], ["Hello</", "answer>tail"], list("Hello</answer>tail"),
                                    ["Hel", "lo<", "/an", "swer", ">", "tail"]])
def test_match_anywhere_cuts_before_it(pieces):
    assert _run(["</answer>"], pieces) == ("Hello", "</answer>")


def test_holds_back_a_possible_start():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("abc ST") == "abc "  # "ST" may start STOP
    assert matcher.push("O") == ""  # "STO" still may
    assert matcher.push("RM") == "STORM"  # no longer can
    assert matcher.push(" ST") == " "
    assert matcher.flush() == "ST"


def test_release_held_text_at_the_end():
    assert _run(["STOP"], ["done ST"]) == ("done ST", None)


def test_earliest_match_wins():
    assert _run(["world", "lo w"], ["hello world"]) == ("hel", "lo w")


def test_overlapping_prefix_is_found():
    # "aab" inside "aaab": a naive matcher that drops the held "aa" on mismatch would miss it.
    assert _run(["aab"], ["a", "a", "a", "b", "c"]) == ("a", "aab")


def test_no_stops_or_before_min_tokens_releases_everything():
    assert _run([], ["a", "b"]) == ("ab", None)
    assert _run(["b"], ["abc"], can_stop=False) == ("abc", None)


def test_multibyte_stop():
    assert _run(["界"], ["世", "界!"]) == ("世", "界")
