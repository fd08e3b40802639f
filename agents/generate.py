"""Batched sampling from a policy in the backspace MDP, with a KV cache that rolls back.

The MDP itself (:class:`seqenv.mdp.SequenceMDP`) tracks every row's state, the action mask, the
step budget and the end of each episode, so the transition logic exists once. The network only
has to supply the logits of each new state.

Rollback (docs/method.md §7), by re-feeding: after every step, each row feeds the last token of its
new state at position (length - 1). After a token that is the token itself; after a backspace it is
the token returned to, fed again at its old position, which overwrites its cache slot and yields the
logits of the state returned to. The deleted token's slot lies beyond that position, so it is out of
sight (see :mod:`agents.models.interface`) until a later token overwrites it. This is the "drop two
and re-feed" choice: it keeps one logits vector per row instead of the logits of every earlier state
(B * L * A floats, gigabytes for a GPT-2 vocabulary), costs one ordinary decoding step per
backspace, and makes the generated logits those of the re-feed training pass of docs/method.md §6
row for row. Ragged rows need nothing more: every row has its own position.

Shapes: B rows, L = max_length, S steps, A actions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from agents.models.interface import PolicyModel, mask_logits
from seqenv.disturbance import KEY_BOUND, Disturbance, NoiseFn
from seqenv.mdp import SequenceMDP
from seqenv.rules import allowed_actions, last_live_index
from seqenv.trajectory import Trajectory

ActionHook = Callable[[SequenceMDP, torch.Tensor], torch.Tensor]
"""``hook(mdp, actions) -> actions``: replaces the policy's (B,) chosen actions before they run."""

COMPACT_AT = 0.75
"""Generation drops the done rows from the KV cache once at most this share of them is live."""


@dataclass(frozen=True)
class GenerationOutput:
    """What :func:`generate` returns.

    Attributes:
        trajectories: one per prompt, with every action taken (backspaces included) and
            terminated or truncated as the MDP ended it.
        generated: per row, the generated ids of the final live state (prompt excluded).
        logits: (B, S, A) float32, the raw logits of each visited state s_t (before masking,
            temperature, top-k and top-p); zero after a row ended. Only with ``return_logits``.
    """

    trajectories: list[Trajectory]
    generated: list[list[int]]
    logits: torch.Tensor | None = None


def select_actions(
    logits: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One action per row, (B,) int64, among the allowed actions of the extended vocabulary.

    Args:
        logits: (B, A) float.
        action_mask: (B, A) bool, the actions the MDP allows.
        greedy: take the most likely allowed action (the other options are then ignored).
        temperature: divides the logits; > 0.
        top_k: keep only the k most likely allowed actions.
        top_p: keep the smallest set of most likely actions whose probability reaches top_p.
        generator: the random stream of the draws.
    """
    allowed = action_mask
    if greedy:
        return mask_logits(logits, allowed).argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
    scores = logits.float() / temperature  # (B, A)
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, scores.shape[-1])
        kth = mask_logits(scores, allowed).topk(k, dim=-1).values[:, -1:]  # (B, 1)
        allowed = allowed & (scores >= kth)
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_scores, order = mask_logits(scores, allowed).sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)  # (B, A)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, A)
        keep_sorted = mass_before < top_p  # the most likely action is always kept
        keep = torch.zeros_like(allowed).scatter(-1, order, keep_sorted)
        allowed = allowed & keep
    probs = mask_logits(scores, allowed).softmax(dim=-1)  # (B, A)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _device_of(model: PolicyModel) -> torch.device:
    return next(iter(model.parameters())).device


@torch.no_grad()
def generate(
    model: PolicyModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_length: int,
    max_steps: int | None = None,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    return_logits: bool = False,
    allow_backspace: bool = True,
    prefixes: Sequence[Sequence[int]] | None = None,
    disturbance: Disturbance | None = None,
    noise_fn: NoiseFn | None = None,
    action_hook: ActionHook | None = None,
) -> GenerationOutput:
    """Sample one episode of the backspace MDP per prompt, all rows in one batch.

    Args:
        model: the policy network (put it in eval mode for deterministic logits).
        prompts: token ids, one prompt per row; lengths may differ.
        max_length: the MDP's buffer size, prompt included (also the cache's capacity).
        max_steps: the step budget (backspaces count); ``None``: the MDP's default.
        greedy: take the most likely allowed action (see :func:`select_actions`).
        temperature: divides the logits when sampling; > 0.
        top_k: when sampling, keep only the k most likely allowed actions.
        top_p: when sampling, keep the smallest set of most likely actions whose probability
            reaches top_p.
        generator: the random stream of the draws.
        use_cache: decode with the KV cache; False recomputes every live state from scratch at
            each step (the reference the cache is tested against, and the slow baseline).
        return_logits: keep the raw logits of every visited state in the output.
        allow_backspace: False masks ``<bkspc>`` everywhere (the no-backspace ablation).
        prefixes: tokens already generated in each row's starting state (deletable, unlike the
            prompt), e.g. a wrong partial answer. A trajectory records them as its first actions
            (appends the policy did not choose), so that it replays to the same final state.
        disturbance: the environment's disturbance (docs/method.md §5): a chosen token may be
            replaced by a noise token before it runs. Each trajectory keeps both: ``actions``
            are what ran, ``intended`` what the policy chose. None: no disturbance.
        noise_fn: the noise of a ``ground_truth`` disturbance (the task's
            ``ground_truth_noise``).
        action_hook: called at every step with the MDP (its rows' current states) and the
            (B,) actions the policy chose; returns the actions to take instead (DAgger's mixing
            of the expert into the rollouts). They are the trajectory's intended actions: a
            disturbance still applies to them.
    """
    special = model.special
    if model.max_positions is not None and max_length > model.max_positions:
        raise ValueError(
            f"max_length={max_length} exceeds the model's {model.max_positions} positions"
        )
    device = _device_of(model)
    B = len(prompts)
    mdp = SequenceMDP(
        special,
        max_length=max_length,
        max_steps=max_steps,
        batch_size=B,
        device=device,
        disturbance=disturbance,
        noise_fn=noise_fn,
    )
    keys = None
    if disturbance is not None and disturbance.active:  # drawn only then: p = 0 streams unchanged
        keys = torch.randint(
            0,
            KEY_BOUND - 1,
            (B,),
            generator=generator,
            device=generator.device if generator else None,
        )
    mdp.reset_rows(range(B), prompts, prefixes, keys=keys)
    S = mdp.max_steps
    rows = torch.arange(B, device=device)
    actions_taken = torch.full((B, S), special.eos_id, dtype=torch.int64, device=device)
    executed_taken = actions_taken.clone()  # differs from actions_taken where disturbed
    step_logits = (
        torch.zeros((B, S, special.num_actions), dtype=torch.float32, device=device)
        if return_logits
        else None
    )

    cache = model.init_cache(B, max_length) if use_cache else None
    active = rows  # the rows of the mdp that the cache holds, in its order
    if cache is not None:
        # Prefill: the prompts, padded on the right; each row's s_0 sits at its last prompt token.
        P = int(mdp.length.max())
        positions = torch.arange(P, device=device).expand(B, P)  # (B, P)
        last = last_live_index(mdp.length)  # (B,)
        logits = model.decode(mdp.tokens[:, :P], positions, cache)[rows, last]  # (B, A)
    else:
        logits = _recompute(model, mdp)

    for step in range(S):
        if step_logits is not None:
            live = ~mdp.done  # (B,)
            step_logits[live, step] = logits[live].float()
        actions = select_actions(
            logits,
            _allowed(mdp, allow_backspace),
            greedy=greedy,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )
        if action_hook is not None:
            actions = action_hook(mdp, actions)
        actions_taken[:, step] = actions  # kept up to each row's own step count
        executed_taken[:, step] = mdp.step(actions).executed
        if bool(mdp.done.all()):
            break
        if cache is None:
            logits = _recompute(model, mdp)
            continue
        # Once a quarter of the decoded rows are done, drop them from the cache: the batch then
        # costs what its live rows cost, not its longest row's. A done row's action is ignored,
        # so its logits stay zero (the draws of the live rows do not depend on them).
        live = ~mdp.done[active]
        if hasattr(cache, "keep_rows") and int(live.sum()) <= COMPACT_AT * len(active):
            keep = torch.nonzero(live).reshape(-1)
            cache.keep_rows(keep)
            active = active[keep]
        # Every decoded row feeds the last token of its new state at its position: the appended
        # token, or after a backspace the token returned to (the re-feed). Rows done since the
        # last compaction re-feed their last token too, harmlessly.
        last = last_live_index(mdp.length)[active, None]  # (R, 1)
        decoded = model.decode(mdp.tokens[active].gather(1, last), last, cache)[:, 0]  # (R, A)
        if len(active) == B:
            logits = decoded
        else:
            logits = decoded.new_zeros((B, decoded.shape[-1]))
            logits[active] = decoded

    num_steps = mdp.num_steps.tolist()
    chosen = actions_taken.cpu().numpy()
    executed = executed_taken.cpu().numpy()
    disturbed = keys is not None

    def with_prefix(b: int, row: np.ndarray) -> np.ndarray:
        prefix = np.asarray(prefixes[b] if prefixes else [], dtype=np.int64)
        return np.concatenate([prefix, row[: num_steps[b]]])

    trajectories = [
        Trajectory(
            prompt=np.asarray(prompts[b], dtype=np.int64),
            actions=with_prefix(b, executed[b]),
            terminated=bool(mdp.terminated[b]),
            truncated=bool(mdp.truncated[b]),
            special=special,
            intended=with_prefix(b, chosen[b]) if disturbed else None,
        )
        for b in range(B)
    ]
    generated = [mdp.generated(b) for b in range(B)]
    if step_logits is not None:
        step_logits = step_logits[:, : max(num_steps)]
    return GenerationOutput(trajectories, generated, step_logits)


def _allowed(mdp: SequenceMDP, allow_backspace: bool) -> torch.Tensor:
    """(B, A) bool: the actions allowed in each row's state (the one rule, :mod:`seqenv.rules`)."""
    return allowed_actions(mdp.length > mdp.prompt_length, mdp.special, allow_backspace)


def _recompute(model: PolicyModel, mdp: SequenceMDP) -> torch.Tensor:
    """Logits (B, A) of every row's live state, from a full causal pass over the states."""
    L = int(mdp.length.max())
    B = mdp.batch_size
    positions = torch.arange(L, device=mdp.device).expand(B, L)  # (B, L)
    logits = model(mdp.tokens[:, :L], positions, None)  # (B, L, A)
    return logits[torch.arange(B, device=mdp.device), last_live_index(mdp.length)]
