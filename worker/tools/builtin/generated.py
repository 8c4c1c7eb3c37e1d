"""The main model's own greedy continuations, as data for distilling its MTP head.

Greedy decoding feeds the model its own argmax tokens, and verification accepts a draft when it equals the
model's next argmax. Text the model wrote is therefore what the head drafts on when the engine runs; the
stdlib's text is not (a greedy continuation soon settles into the model's own idioms and repetitions). A
continuation starts from a window of real text, so it begins where the engine's prompts do.
"""

from __future__ import annotations

import inspect

import torch


@torch.no_grad()
def greedy_continuations(lm, prompts: torch.Tensor, num_new: int, batch_size: int) -> torch.Tensor:
    """prompts [N, P] -> [N, P + num_new]: each prompt followed by the model's greedy tokens, with its cache
    (the end-of-text token is not special: the engine's benchmarks run on past it too). fp32, eval mode."""
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    # transformers renamed past_key_values to cache (5.2x); the image's 5.17 knows only the old name.
    cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    rows = []
    for chunk in prompts.split(batch_size):
        tokens = chunk.to(device)
        out = lm(input_ids=tokens, use_cache=True)
        new = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(num_new - 1):
            out = lm(input_ids=new[-1], use_cache=True, **{cache_arg: out.past_key_values})
            new.append(out.logits[:, -1].argmax(-1, keepdim=True))
        rows.append(torch.cat([tokens, *new], dim=1))
    lm.train(was_training)
    return torch.cat(rows)

