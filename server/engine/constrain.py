"""The grammar stage of a step: fill the constrained rows' masks, apply them, the closing rule.

The engine only calls the methods of each request's Constraint (server/engine/request.py;
server/structured/matcher.py implements it), so nothing here imports the grammar library.
The masks of one step are known before the forward (constraint state only changes when a
token is consumed), so `start` fills them on a worker thread while the model runs;
llguidance and torch both release the GIL. A request whose own grammar work fails (its
mask fill, its closing rule) is handed back as failed; the other rows go on.

The closing rule (Constraint.close) is on for a request from the step its closing budget
(`close_within`) is reached, or from the step its output is seen looping (`looping`: the same
unit of tokens back to back, as a small model repeats one key/value pair or one word; or a
unit the constraint itself knows, `Constraint.repeating`: the same tool call made again);
once on, it stays on. A budget of 0 turns both off.
"""
from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable

import torch

from server.engine import isolation
from server.engine.request import Constraint, Request

MaskRows = dict[str, "torch.Tensor | BaseException"]   # request id -> mask row (W,) or its own failure
LOOP_MAX_PERIOD = 48        # tokens in the repeated unit
LOOP_MIN_REPEATS = 4        # back-to-back copies of it ...
LOOP_MIN_TOKENS = 24        # ... covering at least this many tokens


def looping(ids: list[int]) -> bool:
    """Whether ids end in one unit of 1..LOOP_MAX_PERIOD tokens repeated back to back, at least
    LOOP_MIN_REPEATS times and over at least LOOP_MIN_TOKENS tokens."""
    n = len(ids)
    for period in range(1, min(LOOP_MAX_PERIOD, n // LOOP_MIN_REPEATS) + 1):
        span = max(period * LOOP_MIN_REPEATS, -(-LOOP_MIN_TOKENS // period) * period)
        if span <= n and ids[n - span + period:] == ids[n - span:n - period]:
            return True
    return False


class ConstraintStage:
    def __init__(self, text_of: Callable[[Request], str]) -> None:
        self.text_of = text_of        # a request's output text so far (the closing rule reads it)
        self.overlap = True           # fill during the forward on a worker thread (False: inline)
        self.masking_s = 0.0          # the last constrained step's wait for its masks + applying them
        self._since = 0.0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")

    def start(self, constrained: list[Request]) -> concurrent.futures.Future | None:
        """Begin filling the bitmasks of these requests (all have a constraint)."""
        if not constrained:
            return None
        batch = [r.constraint for r in constrained]
        if self.overlap:
            return self._pool.submit(_fill, batch)
        done: concurrent.futures.Future = concurrent.futures.Future()
        try:
            done.set_result(_fill(batch))
        except Exception as e:
            done.set_exception(e)
        return done

    def rows(self, constrained: list[Request], filling: concurrent.futures.Future | None) -> MaskRows:
        """The filled masks by request; when the batched fill failed, each matcher is filled
        alone so only the ones that fail alone are marked failed."""
        if filling is None:
            return {}
        self._since = time.perf_counter()
        try:
            return {r.request_id: m for r, m in zip(constrained, filling.result().unbind(0))}
        except Exception as e:
            isolation.fatal_if_device(e, "grammar mask")
        out: MaskRows = {}
        for r in constrained:
            try:
                out[r.request_id] = _fill([r.constraint])[0]
            except Exception as e:
                out[r.request_id] = e
        return out

    def apply(self, reqs: list[Request], logits: torch.Tensor, masks: MaskRows
              ) -> tuple[list[Request], torch.Tensor, list[tuple[Request, str]]]:
        """Mask the constrained rows of logits (n, V) to what their grammar allows; inside a
        closing budget, steer toward ending the JSON value. -> (rows kept, their logits, failed)."""
        if not masks:                 # no constrained row this step
            return reqs, logits, []
        failed = [(r, isolation.describe("grammar mask", masks[r.request_id])) for r in reqs
                  if isinstance(masks.get(r.request_id), BaseException)]
        gone = {r.request_id for r, _ in failed}
        rows = [i for i, r in enumerate(reqs) if r.request_id in masks and r.request_id not in gone]
        if rows:
            sub = logits[rows]  # (m, V) a copy: masked in place, then written back
            reqs[rows[0]].constraint.apply_masks(
                sub, torch.stack([masks[reqs[i].request_id] for i in rows]).to(logits.device))
            for j, i in enumerate(rows):
                req = reqs[i]
                m = req.constraint
                if m.close_within and not req.closing:
                    req.closing = (req.params.max_tokens - len(req.output_ids) <= m.close_within
                                   or looping(req.output_ids) or m.repeating(self.text_of(req)))
                if req.closing:
                    try:
                        m.close(sub[j], self.text_of(req))
                    except Exception as e:
                        isolation.fatal_if_device(e, "closing rule")
                        failed.append((req, isolation.describe("closing rule", e)))
                        gone.add(req.request_id)
            logits[rows] = sub
            self.masking_s = time.perf_counter() - self._since
        if not gone:
            return reqs, logits, []
        keep = [i for i, r in enumerate(reqs) if r.request_id not in gone]
        return [reqs[i] for i in keep], logits[keep], failed

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _fill(batch: list[Constraint]):
    return batch[0].fill_masks(batch)   # int32 (n, W)
