"""Every registered policy alone, on hand-made attention: it is pure, never picks a pinned token, and evicts
exactly the tokens a small reference implementation of its paper's rule picks. A new policy needs a reference
here, or the matrix fails."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvbound.kvcache.sequence import SequenceView
from kvbound.policies import make_policy, policy_names

S = 48  # held tokens
OPTIONS = dict(sink_tokens=2, recent_tokens=4, kernel=3, recent_turns=1)
SINKS, RECENT, KERNEL = 2, 4, 3
# Six turns of eight tokens: segment 0 (the system prompt), 1..5 turns.
SEGMENTS = torch.arange(S) // 8


def attention(hot: list[int], seed: int) -> torch.Tensor:
    """A softmax-like row over S tokens: low noise, with most of the mass on `hot`."""
    gen = torch.Generator().manual_seed(seed)
    row = torch.rand(S, generator=gen) * 0.01
    row[hot] += 1.0
    return row / row.sum()


# Three steps of two layers each: a 16-query prefill that looks at tokens 10-13 and 30, then two decode steps
# that look at 20-23. H2O sums all of it, SnapKV keeps the prefill's pooled votes, TOVA keeps the last step.
STEPS = [(16, [attention([10, 11, 12, 13, 30], 1), attention([10, 11, 12, 13, 30], 2)]),
         (1, [attention([20, 21, 22, 23], 3), attention([20, 21, 22, 23], 4)]),
         (1, [attention([20, 21, 22, 23], 5), attention([20, 21, 22, 23], 6)])]


def make_keys() -> list[torch.Tensor]:
    """Two layers of keys (n_kv=2, S, D=8): most tokens near one direction, a few (different per layer) elsewhere."""
    gen = torch.Generator().manual_seed(7)
    layers = []
    for distinct in ([11, 19, 27, 35], [14, 22, 30, 38]):
        keys = torch.tensor([1.0, 0.5, 0, 0, 0, 0, 0, 0]).repeat(2, S, 1) + 0.3 * torch.randn(2, S, 8, generator=gen)
        keys[:, distinct] = torch.randn(2, len(distinct), 8, generator=gen) * 2
        layers.append(keys)
    return layers


KEYS = make_keys()
# What a policy that scores tokens as they are written (Compactor) noted per layer and KV head: (2, 2, S).
RECEIVED = torch.rand(2, 2, S, generator=torch.Generator().manual_seed(9))
RECEIVED[0, 0, [12, 13]] += 3.0
RECEIVED[1, 1, [25, 33]] += 3.0
RECEIVED[1, 0, 20] = float("nan")  # a decoded token: no multi-token step scored it


def pinned() -> torch.Tensor:
    mask = torch.zeros(S, dtype=torch.bool)
    mask[:8] = True  # the system prompt
    mask[40:] = True  # the current turn
    return mask


def lowest(scores: torch.Tensor, count: int) -> set[int]:
    scores = scores.clone()
    scores[pinned()] = float("inf")
    return set(torch.topk(scores, count, largest=False).indices.tolist())


def keep_window(scores: torch.Tensor, recent: int) -> torch.Tensor:
    scores = scores.clone()
    scores[:SINKS] = float("inf")
    if recent:
        scores[-recent:] = float("inf")
    return scores


def ref_window(count: int) -> set[int]:
    """StreamingLLM: the oldest tokens after the sinks go first."""
    return lowest(keep_window(torch.arange(S, dtype=torch.float32), 0), count)


def ref_h2o(count: int) -> set[int]:
    """H2O: attention accumulated over every step and layer; the least attended go first."""
    total = sum(row for _, rows in STEPS for row in rows)
    return lowest(keep_window(total, RECENT), count)


def ref_snapkv(count: int) -> set[int]:
    """SnapKV: the last prefill's votes (max-pooled over KERNEL neighbours, summed over layers); decode steps
    do not vote."""
    votes = sum(F.max_pool1d(row[None, None], KERNEL, 1, KERNEL // 2)[0, 0] for row in STEPS[0][1])
    return lowest(keep_window(votes, RECENT), count)


def ref_tova(count: int) -> set[int]:
    """TOVA: only the newest step's attention (summed over layers) counts."""
    newest = sum(STEPS[-1][1])
    scores = newest.clone()
    scores[-RECENT:] = float("inf")
    return lowest(scores, count)


def ref_keydiff(count: int) -> set[int]:
    """KeyDiff: per layer and head, the cosine of each normalized key to the normalized mean key; the most
    typical (highest cosine, averaged) go first. The newest quarter of the held tokens stays."""
    typical = torch.zeros(S)
    for layer in KEYS:
        for head in layer:
            unit = head / head.norm(dim=-1, keepdim=True)
            anchor = unit.mean(0) / unit.mean(0).norm()
            typical += unit @ anchor / (len(layer) * len(KEYS))
    return lowest(keep_window(-typical, max(RECENT, S // 4)), count)


def compactor_heads() -> torch.Tensor:
    """Compactor, per layer and head: 0.75 × z(leverage of the key among the held keys, ridge 10% of the mean
    diagonal of XᵀX) + z(the attention the token received when written; unscored: its head's mean)."""
    def z(x):
        return (x - x.mean()) / x.std()
    rows = []
    for keys, received in zip(KEYS, RECEIVED):
        lev = torch.empty(keys.shape[:2])
        for h, x in enumerate(keys):
            x = x - x.mean(0)
            gram = x.T @ x
            lev[h] = (x * torch.linalg.solve(gram + 0.1 * gram.diag().mean() * torch.eye(8), x.T).T).sum(-1)
        filled = torch.where(received.isnan(), received.nanmean(-1, keepdim=True), received)
        rows.append(0.75 * z(lev.clamp_min(0)) + z(filled))
    return keep_window(torch.stack(rows).permute(2, 0, 1), RECENT).permute(1, 2, 0)  # (L, H, S)


def ref_compactor(count: int) -> set[int]:
    """Compactor's token order (which segments lose how many): its heads' scores averaged."""
    return lowest(compactor_heads().mean(dim=(0, 1)), count)


def ref_turns(inner):
    """Whole oldest turns first; inside a turn, the inner rule's order."""
    def pick(count: int) -> set[int]:
        order, chosen = order_of(inner), []
        for turn in range(1, 5):
            chosen += [i for i in order if SEGMENTS[i] == turn][: count - len(chosen)]
        return set(chosen)
    return pick


def order_of(ref) -> list[int]:
    """A reference's eviction order: token i precedes j if it is evicted with a smaller count."""
    seen: list[int] = []
    for count in range(1, int((~pinned()).sum()) + 1):
        for i in sorted(ref(count) - set(seen)):
            seen.append(i)
    return seen


REFERENCES = {
    "window": ref_window,
    "h2o": ref_h2o,
    "snapkv": ref_snapkv,
    "tova": ref_tova,
    "keydiff": ref_keydiff,
    "compactor": ref_compactor,
    "turns": ref_turns(ref_window),
    "summarize": ref_turns(ref_window),
    "turns+h2o": ref_turns(ref_h2o),
    "turns+snapkv": ref_turns(ref_snapkv),
    "turns+tova": ref_turns(ref_tova),
    "turns+keydiff": ref_turns(ref_keydiff),
    "turns+compactor": ref_turns(ref_compactor),
}


def observed(policy) -> SequenceView:
    scores = torch.zeros(S)
    for step_tokens, rows in STEPS:
        for layer, row in enumerate(rows):
            before, attn = scores.clone(), row.clone()
            scores = policy.observe(scores, row, layer, step_tokens)
            assert torch.equal(attn, row) and (scores is not before), "observe must not write its inputs"
    return SequenceView(torch.arange(S), SEGMENTS.clone(), scores, pinned(), lambda plain=False: iter(KEYS),
                        RECEIVED.clone())


def test_every_policy_has_a_reference():
    missing = [n for n in policy_names() if n != "none" and n not in REFERENCES]
    assert not missing, f"policies without a reference rule in this matrix: {missing}"
    assert not make_policy("none").evicts


@pytest.mark.parametrize("name", [n for n in policy_names() if n != "none"])
@pytest.mark.parametrize("count", [3, 9, 20])
def test_policy_evicts_what_its_rule_says(name, count):
    policy = make_policy(name, **OPTIONS)
    view = observed(policy)
    frozen = [t.clone() for t in (view.positions, view.segments, view.scores, view.pinned)]
    victims = policy.select(view, count)
    assert all(torch.equal(a, b) for a, b in zip(frozen, (view.positions, view.segments, view.scores,
                                                          view.pinned))), "score/select must not write the view"
    chosen = set(victims.tolist())
    assert len(chosen) == count and not any(view.pinned[i] for i in chosen)
    assert chosen == REFERENCES[name](count), f"{name} evicted {sorted(chosen)}"


def test_the_rules_disagree_on_this_pattern():
    """The matrix separates the policies: on this pattern each attention rule keeps a different set."""
    names = ("window", "h2o", "snapkv", "tova", "keydiff", "compactor")
    picks = {name: frozenset(REFERENCES[name](9)) for name in names}
    assert len(set(picks.values())) == len(names), picks


@pytest.mark.parametrize("name", [n for n in policy_names() if n != "none"])
def test_policy_never_picks_a_pinned_token_when_only_protected_ones_are_left(name):
    """Pins in the middle (recalled text before a question) leave only the newest tokens evictable: those a policy
    protects itself (its recent window) must go before a pinned one does."""
    policy = make_policy(name, **OPTIONS)
    view = observed(policy)
    middle = torch.zeros(S, dtype=torch.bool)
    middle[: S - 3] = True  # everything but the 3 newest tokens is pinned
    view = SequenceView(view.positions, view.segments, view.scores, middle, view.key_layers, view.head_scores)
    chosen = set(policy.select(view, 3).tolist())
    assert chosen == {S - 3, S - 2, S - 1}, f"{name} picked {sorted(chosen)}"


@pytest.mark.parametrize("name", [n for n in policy_names() if n != "none" and make_policy(n).per_head])
@pytest.mark.parametrize("count", [3, 9, 20])
def test_each_head_drops_its_own_lowest_of_each_segment(name, count):
    """A per-head policy: every layer and KV head drops as many tokens of each segment as the token-level choice
    did, its own lowest-scored unpinned ones, so segments and pins keep the same slots in every head."""
    policy = make_policy(name, **OPTIONS)
    view = observed(policy)
    evicted = torch.zeros(S, dtype=torch.bool)
    evicted[policy.select(view, count)] = True
    kept = policy.select_heads(view, evicted, policy.score_heads(view))
    assert kept.shape == (2, 2, S - count)
    heads = compactor_heads()
    for layer in range(2):
        for head in range(2):
            slots = kept[layer, head].tolist()
            assert slots == sorted(slots)
            assert not (set(range(S)) - set(slots)) & set(pinned().nonzero().flatten().tolist()), "a pin was dropped"
            assert torch.equal(SEGMENTS[kept[layer, head]], SEGMENTS[~evicted])  # segments line up slot by slot
            for segment in SEGMENTS[evicted].unique().tolist():
                members = [i for i in range(S) if SEGMENTS[i] == segment and not pinned()[i]]
                dropped = sorted(set(members) - set(slots))
                worst = sorted(members, key=lambda i: float(heads[layer, head, i]))[: len(dropped)]
                assert dropped == sorted(worst), f"{name} layer {layer} head {head} segment {segment}"
    differs = {tuple(kept[layer, head].tolist()) for layer in range(2) for head in range(2)}
    assert len(differs) > 1, "every head kept the same tokens: the choice is not per head"


@pytest.mark.parametrize("ridge", [None, 0.01, 1.0])
def test_compactor_judges_keys_against_every_key_written(ridge):
    """With key moments (every key the sequence wrote, evicted ones too), a key's leverage is measured against
    their mean and covariance, not the held keys': once the text was full of keys like the held outliers, those
    are typical and go first. The ridge is `ridge` (default 0.1) × the mean variance."""
    from kvbound.kvcache.moments import KeyMoments

    gen = torch.Generator().manual_seed(3)
    moments = KeyMoments.zeros(2, 2, 8)
    written = []
    for layer, keys in enumerate(KEYS):
        evicted = keys[:, [11, 14, 19, 22]].repeat(1, 30, 1) + 0.1 * torch.randn(2, 120, 8, generator=gen)
        everything = torch.cat([keys, evicted], dim=1)
        moments.add(layer, everything)
        written.append(everything)
    policy = make_policy("compactor", **OPTIONS, **({} if ridge is None else {"ridge": ridge}))
    view = observed(policy)
    view = SequenceView(view.positions, view.segments, view.scores, view.pinned, view.key_layers, view.head_scores,
                        moments)

    def z(x):
        return (x - x.mean()) / x.std()
    rows = []
    for keys, every, received in zip(KEYS, written, RECEIVED):
        lev = torch.empty(keys.shape[:2])
        for h in range(2):
            mean, cov = every[h].mean(0), torch.cov(every[h].T, correction=0)
            x = keys[h] - mean
            lam = (0.1 if ridge is None else ridge) * cov.diag().mean()
            lev[h] = (x * torch.linalg.solve(cov + lam * torch.eye(8), x.T).T).sum(-1)
        filled = torch.where(received.isnan(), received.nanmean(-1, keepdim=True), received)
        rows.append(0.75 * z(lev.clamp_min(0)) + z(filled))
    heads = keep_window(torch.stack(rows).permute(2, 0, 1), RECENT).permute(1, 2, 0)
    assert torch.allclose(policy.score_heads(view), heads, atol=1e-4)
    chosen = set(policy.select(view, 9).tolist())
    assert chosen == lowest(heads.mean(dim=(0, 1)), 9)
    assert chosen != ref_compactor(9), "the moments changed nothing"


@pytest.mark.parametrize("neighbours", [1, 3, 7])
def test_compactor_ingest_is_tiled_noncausal_attention_averaged_over_neighbours(neighbours):
    """What compactor notes when a step writes T tokens: per tile, the softmax of every query over every key of
    the tile (no causal mask), summed over queries and averaged over the KV head's query heads, times the value
    norm, then averaged over the `neighbours` tokens around each (fewer at the edges). A key that one tile's
    queries all look at raises its neighbours too, as far as the window reaches and no further."""
    gen = torch.Generator().manual_seed(4)
    H, n_kv, T, D, tile = 4, 2, 20, 8, 8
    q, k = torch.randn(H, T, D, generator=gen), torch.randn(n_kv, T, D, generator=gen)
    v = torch.rand(n_kv, T, D, generator=gen)
    k[:, [0, 1, 2, 3, 4, 6, 7]] *= 0.1
    q[:, :8] = k[:, 5].repeat_interleave(H // n_kv, 0)[:, None] * 4  # the first tile's queries all match key 5
    ref = torch.zeros(n_kv, T)
    for h in range(n_kv):
        for start in range(0, T, tile):
            sl = slice(start, min(T, start + tile))
            for g in range(H // n_kv):
                weights = torch.softmax(q[h * (H // n_kv) + g, sl] @ k[h, sl].T / D ** 0.5, dim=-1)
                ref[h, sl] += weights.sum(0) / (H // n_kv)
    ref = ref * v.norm(dim=-1)
    half = neighbours // 2
    ref = torch.stack([ref[:, max(0, i - half):i + half + 1].mean(-1) for i in range(T)], dim=-1)
    got = make_policy("compactor", tile=tile, neighbours=neighbours).ingest(q, k, v)
    assert torch.allclose(got, ref, atol=1e-5)
    raised = got[:, :8] > got[:, 5:6] / 2  # the first tile's keys but 5 get almost nothing: only the window lifts them
    assert raised.all(dim=0).nonzero().flatten().tolist() == list(range(max(0, 5 - half), min(8, 6 + half)))


def test_compactor_rejects_an_even_or_empty_window_and_a_ridge_not_above_zero():
    for bad in (0, 2, -3):
        with pytest.raises(ValueError, match="odd number"):
            make_policy("compactor", neighbours=bad)
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="ridge must be > 0"):
            make_policy("compactor", ridge=bad)
