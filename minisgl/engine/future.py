"""The future-token map: how a step can be built before the step ahead of it has sampled (chapter 06).

With overlap scheduling the scheduler builds step N+1 while step N still runs, so a running request's
next input token, the one step N is sampling, is not known yet. The scheduler puts a stand-in in its place
(``core.future_token``: -1 - the request's slot). Step N writes each sampled token into the engine's
future-token map at its request's slot, on the device; step N+1, which the device runs after step N, swaps
its stand-ins for the map's values before the model reads them. No token comes back to the CPU in between.
"""

import torch


# --8<-- [start:resolve-future]
def resolve_future_tokens(input_ids: torch.Tensor, future_tokens: torch.Tensor) -> torch.Tensor:
    """A batch's input ids with every stand-in (``core.future_token(slot)``, -1 - slot) replaced by the token
    the future-token map holds at that slot, on the device: no value comes back to the CPU. ``input_ids``
    [tokens] int64, real ids >= 0; ``future_tokens`` [slots] int64. Returns a new tensor like ``input_ids``."""
    # --8<-- [start:ex-future-tokens]
    is_future = input_ids < 0
    slots = torch.where(is_future, -1 - input_ids, 0)  # a real token's row reads slot 0, then is not used
    return torch.where(is_future, future_tokens[slots], input_ids)
    # --8<-- [end:ex-future-tokens]
# --8<-- [end:resolve-future]
