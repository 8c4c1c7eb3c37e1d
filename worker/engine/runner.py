"""Runs one step plan: flat inputs -> target forward -> sample / verify -> drafts for the next step.

The step never waits for the device but once: host inputs go through pinned memory without
blocking, and the emitted tokens, new drafts and logprobs come back as one packed non-blocking copy
into pinned memory followed by one event wait (worker.engine.host_io).
"""

import torch

from worker.engine.decode_graphs import DecodeGraphs, DecodeResult
from worker.engine.host_io import PendingHostCopy, index_tensor, to_device
from worker.engine.plan import SequenceOutput, StepOutput, StepPlan
from worker.engine.prompt_logprobs import PromptLogprobs
from worker.engine.proposer import ProposalInputs, Proposer
from worker.engine.sampler import RequestSampling, max_num_top_logprobs, sample, verify_drafts
from worker.engine.step_inputs import SequenceSlice, build_step_inputs
from worker.model.context import forward_context


class ModelRunner:
    def __init__(self, model, block_size: int, num_spec_tokens: int, device: torch.device,
                 proposer: Proposer | None = None, seed: int = 0, eos_token_ids: list[int] = ()):
        self.model = model
        self.block_size = block_size
        self.num_spec_tokens = num_spec_tokens
        self.device = torch.device(device)
        self.proposer = proposer
        self.eos_token_ids = list(eos_token_ids)
        self.requests: dict[str, RequestSampling] = {}
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.prompt_logprobs = PromptLogprobs()
        self.decode_graphs: DecodeGraphs | None = None  # decode-only steps on static buffers (set by the worker)

    def execute(self, plan: StepPlan) -> StepOutput:
        return self.launch(plan).finish()

    @torch.inference_mode()
    def launch(self, plan: StepPlan, previous: "PendingStep | None" = None) -> "PendingStep":
        """Queue the step's device work; `finish()` waits for its results. With `previous` (a decode step
        still in flight), `plan` is its successor planned ahead: each sequence's tokens (the one after
        its accepted drafts, then the new drafts), start and state slot come from `previous` on the device."""
        for request in plan.new_requests:
            self.requests[request.request_id] = RequestSampling(
                request.params, request.prompt_token_ids, self.eos_token_ids)
        for request_id in plan.finished_request_ids:  # after the new ones: a request may start and end in one plan
            self.requests.pop(request_id, None)
        self.prompt_logprobs.track(plan)
        if not plan.sequences:
            return PendingStep(output=StepOutput([]))
        rows = [self.requests[s.request_id] for s in plan.sequences]
        if previous is not None:
            if not self.can_run_ahead(plan.sequences, rows) or previous.decode is None:
                raise ValueError("a step planned ahead must follow, and be, a step of the decode graphs")
            return self._launch_decode(plan, rows, previous.decode)
        if self.decode_graphs is not None and self.decode_graphs.can_run(plan.sequences, rows):
            return self._launch_decode(plan, rows)
        return PendingStep(output=self._execute_general(plan))

    def can_run_ahead(self, sequences, rows: list[RequestSampling]) -> bool:
        """Whether the successor of this decode step can be launched before its tokens are known: its
        drafts (if any) must come from the graphs, not from a proposer on the host."""
        graphs = self.decode_graphs
        return (graphs is not None and (self.num_spec_tokens == 0 or graphs.proposer is not None)
                and graphs.can_run(sequences, rows, extra_outputs=1 + self.num_spec_tokens))

    def _execute_general(self, plan: StepPlan) -> StepOutput:
        """Any step, eagerly: prefill chunks, mixed steps, penalties, min_tokens masking."""
        q_len = 1 + self.num_spec_tokens
        slices = [SequenceSlice(s.token_ids, s.start_position, s.block_table, s.state_group,
                                s.num_accepted_slot, s.is_decode) for s in plan.sequences]
        input_ids, positions, ctx = build_step_inputs(slices, self.block_size, q_len, self.device)
        with forward_context(ctx):
            hidden = self.model(input_ids, positions)
        prompt_logprobs = self.prompt_logprobs.compute(plan, hidden, self.model.compute_logits)
        emitted = _Emitted(plan, q_len)
        self._sample(plan, hidden, emitted)
        drafts = None
        if self.num_spec_tokens and emitted.sampled:
            drafts = self._propose(plan, ctx, input_ids, positions, hidden, emitted)
        output = emitted.to_output(drafts, self.requests)
        self.prompt_logprobs.attach(output, prompt_logprobs)
        return output

    def _launch_decode(self, plan: StepPlan, rows: list[RequestSampling],
                       previous: DecodeResult | None = None) -> "PendingStep":
        """A decode-only step through the decode graphs (or the same code eagerly), its results queued
        for the host."""
        result = self.decode_graphs.run(plan.sequences, rows, self.generator, previous)
        num_seqs = len(plan.sequences)
        emitted = _Emitted(plan, 1 + self.num_spec_tokens)
        emitted.decode_tokens, emitted.num_accepted = result.token_ids[:num_seqs], result.num_accepted[:num_seqs]
        num_top = max_num_top_logprobs(rows)
        if num_top is not None:
            top = None if num_top == 0 else tuple(t[:num_seqs, :, :num_top] for t in result.top_logprobs)
            emitted.decode_logprobs = (result.logprobs[:num_seqs], top)
        drafts = None if result.drafts is None else result.drafts[:num_seqs]
        if self.num_spec_tokens and drafts is None:  # a proposer outside the graph (e.g. scripted drafts)
            drafts = self._propose(plan, result.ctx, result.input_ids, result.positions, result.hidden_states,
                                   emitted)
        emitted.queue_host_copy(drafts)
        return PendingStep(emitted=emitted, drafts=drafts, requests=self.requests, decode=result)

    def _sample(self, plan: StepPlan, hidden: torch.Tensor, emitted: "_Emitted") -> None:
        decodes = [s for s in plan.sequences if s.is_decode]
        num_dec_rows = len(decodes) * emitted.q_len
        prefill_rows = [emitted.last_row(i) for i in emitted.sampled_prefills]
        row_index = index_tensor(list(range(num_dec_rows)) + prefill_rows, self.device)
        logits = self.model.compute_logits(hidden[row_index]).float()
        if decodes:
            rows = [self.requests[s.request_id] for s in decodes]
            dec_logits = logits[:num_dec_rows]
            if self.num_spec_tokens:
                drafts = to_device([s.token_ids[1:] for s in decodes], torch.long, self.device)
                result = verify_drafts(dec_logits.view(len(decodes), emitted.q_len, -1), drafts, rows, self.generator)
                emitted.set_verified(result)
            else:
                emitted.set_decoded(sample(dec_logits, rows, default_generator=self.generator))
        if prefill_rows:
            rows = [self.requests[plan.sequences[i].request_id] for i in emitted.sampled_prefills]
            emitted.set_prefilled(sample(logits[num_dec_rows:], rows, default_generator=self.generator))

    def _propose(self, plan, ctx, input_ids, positions, hidden, emitted: "_Emitted") -> torch.Tensor:
        anchor_rows, anchor_next = emitted.anchors(self.device)
        inputs = ProposalInputs(
            plan=plan, ctx=ctx, input_ids=input_ids, positions=positions, hidden_states=hidden,
            anchor_rows=anchor_rows, anchor_next_ids=anchor_next, sampled=emitted.sampled,
            emitted=emitted.host_tokens,
        )
        return self.proposer.propose(inputs)


class PendingStep:
    """A launched step: its output is ready (an eager step) or waits on its queued host copy."""

    def __init__(self, output: StepOutput | None = None, emitted: "_Emitted | None" = None,
                 drafts: torch.Tensor | None = None, requests: dict | None = None, decode: DecodeResult | None = None):
        self.output, self.emitted, self.drafts, self.requests = output, emitted, drafts, requests
        self.decode = decode  # the decode graphs' result (device tensors) of a decode step

    def finish(self) -> StepOutput:
        if self.output is None:
            self.output = self.emitted.to_output(self.drafts, self.requests)
        return self.output


class _Emitted:
    """Collects the step's sampling results on the device and turns them into per-sequence outputs."""

    def __init__(self, plan: StepPlan, q_len: int):
        self.plan = plan
        self.q_len = q_len
        self.num_decodes = sum(1 for s in plan.sequences if s.is_decode)
        self.starts = [0]
        for s in plan.sequences:
            self.starts.append(self.starts[-1] + len(s.token_ids))
        self.sampled_prefills = [i for i, s in enumerate(plan.sequences) if not s.is_decode and s.sample]
        self.sampled = list(range(self.num_decodes)) + self.sampled_prefills
        self.decode_tokens = None  # [D, Q] padded with -1
        self.num_accepted = None  # [D]
        self.decode_logprobs = None
        self.prefill_tokens = None  # [P]
        self.prefill_logprobs = None
        self._queued: PendingHostCopy | None = None
        self._host = None

    def last_row(self, i: int) -> int:
        return self.starts[i + 1] - 1

    def set_verified(self, result) -> None:
        self.decode_tokens, self.num_accepted = result.token_ids, result.num_accepted
        self.decode_logprobs = (result.logprobs, result.top_logprobs)

    def set_decoded(self, result) -> None:
        self.decode_tokens = result.token_ids[:, None]
        self.num_accepted = torch.zeros_like(result.token_ids)
        top = None if result.top_logprobs is None else (result.top_logprobs[0][:, None], result.top_logprobs[1][:, None])
        self.decode_logprobs = (None if result.logprobs is None else result.logprobs[:, None], top)

    def set_prefilled(self, result) -> None:
        self.prefill_tokens = result.token_ids
        self.prefill_logprobs = (result.logprobs, result.top_logprobs)

    def anchors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (row of the last accepted position, the token after it), for every sequence of the plan."""
        rows = index_tensor([self.last_row(i) for i in range(len(self.plan.sequences))], device)
        next_ids = index_tensor([s.next_token_id if s.next_token_id is not None else -1 for s in self.plan.sequences],
                                device)
        if self.num_decodes:
            starts = index_tensor(self.starts[: self.num_decodes], device)
            rows[: self.num_decodes] = starts + self.num_accepted
            next_ids[: self.num_decodes] = self.decode_tokens.gather(1, self.num_accepted[:, None]).squeeze(1)
        if self.sampled_prefills:
            next_ids[index_tensor(self.sampled_prefills, device)] = self.prefill_tokens
        return rows, next_ids

    def queue_host_copy(self, drafts: torch.Tensor | None = None) -> None:
        """Queue every result tensor (drafts too, when given) for the host in one packed copy; the
        step's one wait comes in `_to_host`. A no-op once the results are on the host."""
        if self._host is not None:
            return
        dec_lp, dec_top = self.decode_logprobs or (None, None)
        pre_lp, pre_top = self.prefill_logprobs or (None, None)
        self._queued = PendingHostCopy(dict(
            decode_tokens=self.decode_tokens, num_accepted=self.num_accepted, prefill_tokens=self.prefill_tokens,
            decode_lp=dec_lp, decode_top_values=None if dec_top is None else dec_top[0],
            decode_top_ids=None if dec_top is None else dec_top[1], prefill_lp=pre_lp,
            prefill_top_values=None if pre_top is None else pre_top[0],
            prefill_top_ids=None if pre_top is None else pre_top[1], drafts=drafts,
        ))

    def _to_host(self, drafts: torch.Tensor | None = None):
        """The step's one wait: every result tensor in one packed copy (drafts too, when given)."""
        if self._host is None:
            if self._queued is None:
                self.queue_host_copy(drafts)
            self._host = self._queued.result()
            for part in ("decode", "prefill"):
                values, ids = self._host.pop(f"{part}_top_values"), self._host.pop(f"{part}_top_ids")
                self._host[f"{part}_top"] = None if values is None else (values, ids)
        elif drafts is not None and self._host.get("drafts") is None:  # tokens fetched first (a host-side proposer)
            self._host["drafts"] = PendingHostCopy({"drafts": drafts}).result()["drafts"]
        return self._host

    def host_tokens(self) -> list[list[int]]:
        host = self._to_host()
        tokens = [[] for _ in self.plan.sequences]
        for i in range(self.num_decodes):
            tokens[i] = host["decode_tokens"][i][: host["num_accepted"][i] + 1]
        for j, i in enumerate(self.sampled_prefills):
            tokens[i] = [host["prefill_tokens"][j]]
        return tokens

    def to_output(self, drafts: torch.Tensor | None, requests: dict) -> StepOutput:
        host = self._to_host(drafts)
        draft_lists = host.get("drafts")
        draft_row = {seq_index: row for row, seq_index in enumerate(self.sampled)}
        prefill_row = {seq_index: row for row, seq_index in enumerate(self.sampled_prefills)}
        tokens = self.host_tokens()
        outputs = []
        for i, entry in enumerate(self.plan.sequences):
            out = SequenceOutput(token_ids=tokens[i])
            if entry.is_decode:
                out.num_accepted_drafts = host["num_accepted"][i]
            if draft_lists is not None and i in draft_row:
                out.draft_token_ids = draft_lists[draft_row[i]]
            request = requests[entry.request_id]
            if tokens[i] and request.params.logprobs is not None:
                out.logprobs = self._logprobs(host, entry.is_decode, i if entry.is_decode else prefill_row[i],
                                              len(tokens[i]))
            if tokens[i]:
                request.append_output(tokens[i])
            outputs.append(out)
        return StepOutput(outputs)

    @staticmethod
    def _logprobs(host, is_decode: bool, row: int, count: int) -> list:
        """-> [(logprob, [(token_id, logprob), ...top-n])] for the row's `count` emitted tokens."""
        if is_decode:
            values, top = host["decode_lp"][row], host["decode_top"]
            top = None if top is None else (top[0][row], top[1][row])
        else:
            values, top = [host["prefill_lp"][row]], host["prefill_top"]
            top = None if top is None else ([top[0][row]], [top[1][row]])
        return [(values[j], [] if top is None else list(zip(top[1][j], top[0][j]))) for j in range(count)]
