"""The decoding engine: greedy outputs equal HF generate, with random and "cheating" drafts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import num_threads, target_spec
from helpers.engine import CheatDraft, compactions, hf_greedy, prompt, random_draft

from dovetail_infer import engine
from dovetail_infer.checkpoint import save_draft
from dovetail_infer.engine import Dovetail, InferConfig
from dovetail_infer.models.linear import QUANT_BITS, QuantLinear
from dovetail_infer.models.target import Target, load_target

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bf16_target() -> Target:
    return load_target(target_spec("tiny_random", dtype="bfloat16"))


# ---- greedy equality ------------------------------------------------------------------------------

GRID = [  # budget, depth, top_k, seed
    (1, 1, 1, 0),
    (4, 4, 1, 1),
    (4, 3, 2, 2),
    (8, 6, 4, 3),
    (8, 3, 2, 4),
    (16, 6, 4, 5),
    (16, 8, 2, 6),
]


def test_baseline_equals_hf(tiny_target):
    eng = Dovetail(tiny_target, None, "cpu")
    for i in range(2):
        ids = prompt(tiny_target, i)
        r = eng.generate_baseline(ids, InferConfig(max_new_tokens=24))
        assert r.output_ids == hf_greedy(tiny_target, ids, 24) and r.forwards == 23
        assert eng.generate(ids, InferConfig(max_new_tokens=24)).output_ids == r.output_ids  # draft=None


@pytest.mark.parametrize("budget,depth,top_k,seed", GRID)
def test_greedy_random_draft_equals_hf(tiny_target, budget, depth, top_k, seed):
    ids = prompt(tiny_target, seed % 3)
    eng = Dovetail(tiny_target, random_draft(tiny_target, depth=1 + seed % 2, seed=seed), "cpu")
    r = eng.generate(ids, InferConfig(budget=budget, depth=depth, top_k=top_k, max_new_tokens=24, seed=seed))
    assert r.output_ids == hf_greedy(tiny_target, ids, 24)
    assert r.tau < 1.3  # an untrained draft is (almost) never right: about one token per forward
    assert r.new_tokens == 24 and r.forwards == len(r.accept_lengths) and sum(r.accept_lengths) <= 2


@pytest.mark.parametrize("budget,depth,top_k,seed", GRID)
def test_greedy_cheating_draft_equals_hf(tiny_target, monkeypatch, budget, depth, top_k, seed):
    n = 40
    ids = prompt(tiny_target, seed % 3)
    ref = hf_greedy(tiny_target, ids, n)
    moved = compactions(monkeypatch)
    eng = Dovetail(tiny_target, CheatDraft(tiny_target, ids + ref, seed=seed), "cpu")
    r = eng.generate(ids, InferConfig(budget=budget, depth=depth, top_k=top_k, max_new_tokens=n, seed=seed))
    assert r.output_ids == ref
    assert r.tau > 1 + 0.4 * min(budget, depth) ** 0.5  # long paths accepted
    assert r.accepted_per_depth[0] == sum(a > 0 for a in r.accept_lengths)
    assert sum(r.accept_lengths) + r.forwards + 1 >= n  # every token is accounted for
    if top_k > 1 and budget >= 4:
        assert sum(moved) > 0  # accepted paths left the first branch: the cache really got compacted


@pytest.mark.parametrize("budget,depth,top_k", [(8, 6, 4), (4, 4, 1), (16, 5, 2)])
def test_greedy_bfloat16(bf16_target, budget, depth, top_k):
    """bf16 against the bf16 HF reference (same weights, same dtype); untrained and cheating drafts."""
    ids = prompt(bf16_target, budget % 3)
    ref = hf_greedy(bf16_target, ids, 24)
    base = Dovetail(bf16_target, None, "cpu").generate_baseline(ids, InferConfig(max_new_tokens=24))
    assert base.output_ids == ref
    cfg = InferConfig(budget=budget, depth=depth, top_k=top_k, max_new_tokens=24)
    for draft in (random_draft(bf16_target), CheatDraft(bf16_target, ids + ref)):
        assert Dovetail(bf16_target, draft, "cpu").generate(ids, cfg).output_ids == ref


def test_stops_at_eos_inside_an_accepted_path(tiny_target, monkeypatch):
    ids = prompt(tiny_target, 1)
    ref = hf_greedy(tiny_target, ids, 32)
    eos = ref[17]
    monkeypatch.setattr(Target, "eos_ids", property(lambda self: [eos]))
    eng = Dovetail(tiny_target, CheatDraft(tiny_target, ids + ref), "cpu")
    for e in (eng, Dovetail(tiny_target, None, "cpu")):
        r = e.generate(ids, InferConfig(budget=8, depth=8, top_k=1, max_new_tokens=32))
        assert r.output_ids == ref[: ref.index(eos) + 1]


# ---- the draft side: tree scratch and commits are the same as a plain causal draft forward ---------


@torch.no_grad()
def plain_draft_pred(eng: Dovetail, feats: torch.Tensor, next_ids: list[int]) -> torch.Tensor:
    """The draft without cache or tree: features (T, D) paired with next tokens -> last prediction."""
    emb = F.embedding(torch.tensor(next_ids), eng.draft_side.embed)
    return eng.draft(feats[None], emb[None])[0, -1]


def test_draft_tree_and_commit_match_a_plain_forward(tiny_target, monkeypatch):
    """Every draft distribution in every tree (built on scratch with a tree mask, after commits of
    several accepted tokens) equals a no-cache causal draft forward over the true features so far
    followed by the predicted features along the node's branch."""
    ids = prompt(tiny_target, 0)
    eng = Dovetail(tiny_target, random_draft(tiny_target, depth=2), "cpu")
    grow, trees = eng.draft_side.grow, []
    monkeypatch.setattr(eng.draft_side, "grow", lambda *a: trees.append(grow(*a)) or trees[-1])

    def accept_two(tree, logits):  # force long commits: accept the first branch up to depth 2
        path, kids = [0], tree.children()
        while kids[path[-1]] and len(path) < 3:
            path.append(kids[path[-1]][0])
        return path, int(logits[path[-1]].argmax())

    monkeypatch.setattr(engine, "greedy_accept", accept_two)
    out = eng.generate(ids, InferConfig(budget=6, depth=3, top_k=2, max_new_tokens=12, min_prob=0.0)).output_ids
    assert len(trees) == 4
    for step, (tree, dists) in enumerate(trees):
        seq = ids + out[: 1 + 3 * step]  # committed tokens + this tree's root
        true = tiny_target.model(torch.tensor([seq]))[0, :-1]  # true features f_0 .. f_{root-1}
        for node, kids in enumerate(tree.children()):
            if not kids:
                continue
            branch = [node]
            while tree.parents[branch[0]] > 0:
                branch.insert(0, tree.parents[branch[0]])
            feats, toks = true, seq[1:]
            pred = plain_draft_pred(eng, feats, toks)  # the root's predicted feature
            for b in branch if node else []:
                feats, toks = torch.cat([feats, pred[None]]), toks + [tree.tokens[b]]
                pred = plain_draft_pred(eng, feats, toks)
            want = torch.log_softmax(F.linear(pred, eng.draft_side.head).float(), -1)
            torch.testing.assert_close(dists[tree.cand[node]], want, atol=1e-4, rtol=1e-4)


# ---- errors, loading, stats ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_temperature_must_be_finite_and_non_negative(bad):
    with pytest.raises(ValueError, match="InferConfig.temperature must be a finite number"):
        InferConfig(temperature=bad)


@pytest.mark.parametrize("field", ["budget", "depth", "top_k", "max_new_tokens"])
@pytest.mark.parametrize("bad", [0, -2])
def test_config_errors_name_the_field(field, bad):
    with pytest.raises(ValueError, match=f"InferConfig.{field} must be an integer >= 1"):
        InferConfig(**{field: bad})


def test_context_errors(tiny_target):
    eng = Dovetail(tiny_target, random_draft(tiny_target), "cpu", max_len=64)
    with pytest.raises(ValueError, match="exceed the context of 64"):
        eng.generate(list(range(1, 50)), InferConfig(max_new_tokens=8, budget=8))
    with pytest.raises(ValueError, match="exceed the context of 2048"):
        Dovetail(tiny_target, None, "cpu").generate_baseline([1] * 2040, InferConfig(max_new_tokens=16))
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        eng.generate([], InferConfig())
    with pytest.raises(ValueError, match="token ids in"):
        eng.generate([1, 10**6], InferConfig())
    assert eng.generate(list(range(1, 41)), InferConfig(max_new_tokens=16, budget=8)).new_tokens == 16  # fits exactly


def test_from_pretrained_and_stats(tiny_target, tmp_path):
    draft = random_draft(tiny_target, depth=2, seed=7)
    save_draft(draft, tmp_path / "d", tiny_target.identity())
    ids = prompt(tiny_target, 2)
    eng = Dovetail.from_pretrained(tmp_path / "d", tiny_target, draft_device="cpu")
    cfg = InferConfig(budget=8, depth=4, top_k=2, max_new_tokens=16)
    r = eng.generate(ids, cfg)
    assert r.output_ids == hf_greedy(tiny_target, ids, 16)
    assert r.tau == pytest.approx((r.new_tokens - 1) / r.forwards) and r.transfer_bytes > 0
    parts = r.draft_s + r.verify_s + r.transfer_s + r.other_s
    assert r.prefill_s > 0 and parts == pytest.approx(r.decode_s, rel=1e-6, abs=1e-6)
    assert r.tokens_per_s == pytest.approx(r.new_tokens / r.decode_s)
    r2 = eng.generate(ids, cfg)  # caches are reused across calls
    assert r2.output_ids == r.output_ids


@pytest.mark.slow
def test_smollm2_greedy_equals_hf(smollm2_target):
    target = smollm2_target
    ids_list = [prompt(target, i) for i in range(3)]
    eng = Dovetail(target, random_draft(target), "cpu")
    for ids in ids_list:
        ref = hf_greedy(target, ids, 32)
        r = eng.generate(ids, InferConfig(budget=8, depth=4, top_k=2, max_new_tokens=32))
        assert r.output_ids == ref
        assert eng.generate_baseline(ids, InferConfig(max_new_tokens=32)).output_ids == ref
        cheat = Dovetail(target, CheatDraft(target, ids + ref), "cpu")
        assert cheat.generate(ids, InferConfig(budget=8, depth=6, top_k=2, max_new_tokens=32)).output_ids == ref


@pytest.mark.slow
@pytest.mark.parametrize("quant", [None, "int4"])
def test_smollm2_bfloat16_drafts_equal_one_token_decoding(quant):
    """bf16 (and int4) SmolLM2: chain drafts and trees with siblings give exactly our one-token-at-a-time
    greedy output, because every kernel is batch-invariant (a lone bf16 row runs as a pair, see PackedLinear;
    before, 4 of 6 bench answers parted at a near-tie) and attention sums a node's keys in position order
    (`split_attention`; summed by cache slot, a node that sees its ancestors across its siblings' slots
    rounded apart: bench answers parted at near-ties for trees)."""
    target = load_target(target_spec("smollm2_135m", dtype="bfloat16", quant=quant))
    base = Dovetail(target, None, "cpu")
    with num_threads(2):  # how the kernels split their work depends on the thread count: test the real one
        for i in range(3):
            ids = prompt(target, i)
            ref = base.generate_baseline(ids, InferConfig(max_new_tokens=40)).output_ids
            cheat = Dovetail(target, CheatDraft(target, ids + ref, noise=0.5), "cpu")
            for b in (1, 3, 6):
                r = cheat.generate(ids, InferConfig(budget=b, depth=b, top_k=1, max_new_tokens=40))
                assert r.output_ids == ref and r.tau > 1.2, (i, b)  # drafts were accepted
            assert base.generate(ids, InferConfig(max_new_tokens=40, lookup=4)).output_ids == ref  # looked-up chains
            r = cheat.generate(ids, InferConfig(budget=16, depth=8, top_k=4, max_new_tokens=40))
            assert r.output_ids == ref and r.tau > 1.2, i


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_draft_stays_lossless_and_keeps_the_callers_draft(tiny_target, quant):
    n, ids = 32, prompt(tiny_target, 2)
    ref = hf_greedy(tiny_target, ids, n)
    draft = CheatDraft(tiny_target, ids + ref, noise=0.1)
    eng = Dovetail(tiny_target, draft, "cpu", draft_quant=quant)
    quantized = [m for m in eng.draft.modules() if isinstance(m, QuantLinear)]
    assert quantized and all(m.bits == QUANT_BITS[quant] for m in quantized)
    assert isinstance(eng.draft_side.head_fn, QuantLinear)
    assert not any(isinstance(m, QuantLinear) for m in draft.modules())  # the caller's draft is untouched
    r = eng.generate(ids, InferConfig(budget=6, depth=4, top_k=2, max_new_tokens=n))
    assert r.output_ids == ref
    plain = Dovetail(tiny_target, draft, "cpu").generate(ids, InferConfig(budget=6, depth=4, top_k=2, max_new_tokens=n))
    assert r.tau > max(1.5, 0.75 * plain.tau)  # the quantized draft still proposes mostly what the draft does
    with pytest.raises(ValueError, match="draft_quant"):
        Dovetail(tiny_target, draft, "cpu", draft_quant="int3")


def test_reduced_draft_vocab_stays_lossless_and_proposes_only_frequent_tokens(tiny_target, tmp_path):
    n, ids = 32, prompt(tiny_target, 1)
    ref = hf_greedy(tiny_target, ids, n)
    counts = torch.zeros(tiny_target.config.vocab_size, dtype=torch.long)
    counts[ref[: n // 2]] = 5  # the first half of the continuation is "frequent"; the rest is not
    draft = CheatDraft(tiny_target, ids + ref, noise=0.0)
    eng = Dovetail(tiny_target, draft, "cpu", draft_vocab=64, token_counts=counts)
    assert eng.draft_side.head.shape[0] == 64 and set(ref[: n // 2]) <= set(eng.draft_side.d2t.tolist())
    r = eng.generate(ids, InferConfig(budget=4, depth=4, top_k=1, max_new_tokens=n))
    assert r.output_ids == ref
    full = Dovetail(tiny_target, draft, "cpu").generate(ids, InferConfig(budget=4, depth=4, top_k=1, max_new_tokens=n))
    assert r.tau > 1.5 and full.tau >= r.tau  # rare tokens can no longer be proposed
    with pytest.raises(ValueError, match="token counts"):
        Dovetail(tiny_target, draft, "cpu", draft_vocab=64)
    save_draft(random_draft(tiny_target), tmp_path / "d", tiny_target.identity())  # no counts: full vocabulary
    assert Dovetail.from_pretrained(tmp_path / "d", tiny_target, "cpu", draft_vocab=64).draft_side.d2t is None


def test_min_prob_stops_drafting_early_and_stays_lossless(tiny_target):
    n, ids = 32, prompt(tiny_target, 2)
    ref = hf_greedy(tiny_target, ids, n)
    eng = Dovetail(tiny_target, random_draft(tiny_target, depth=2), "cpu")
    full = eng.generate(ids, InferConfig(budget=8, depth=6, top_k=2, max_new_tokens=n, min_prob=0.0))
    early = eng.generate(ids, InferConfig(budget=8, depth=6, top_k=2, max_new_tokens=n, min_prob=0.5))
    assert full.output_ids == early.output_ids == ref
    assert early.draft_s < full.draft_s  # an untrained draft is never confident: one level per forward
    with pytest.raises(ValueError, match="min_prob"):
        InferConfig(min_prob=1.0)
