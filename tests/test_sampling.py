"""Acceptance rules with stub distributions, and end-to-end losslessness on a small-vocabulary target."""

from __future__ import annotations

import itertools

import pytest
import torch

from dovetail_infer.engine import Dovetail, InferConfig
from dovetail_infer.models.draft import DraftConfig, DraftModel
from dovetail_infer.models.target import load_target
from dovetail_infer.sampling import argmax, greedy_accept, gumbel_pick, probs, sample_accept, verify_node
from dovetail_infer.tree import DraftTree

pytestmark = pytest.mark.usefixtures("one_thread")


def chi2_pvalue(counts: torch.Tensor, expected_p: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; outcomes expected < 5 times are pooled into one bin."""
    n = counts.sum()
    exp = expected_p.double() * n
    small = exp < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def test_chi2_detects_a_wrong_distribution():
    p = torch.tensor([0.5, 0.3, 0.2])
    assert chi2_pvalue(torch.tensor([5000, 3000, 2000]), p) > 0.5
    assert chi2_pvalue(torch.tensor([5300, 2800, 1900]), p) < 1e-6


def test_probs_top_p():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).log_softmax(-1) * 1.0  # p ~ .64 .24 .09 .03
    assert torch.allclose(probs(logits, 1.0), logits.exp())
    p = probs(logits, 1.0, top_p=0.8)
    assert (p[2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    assert (probs(logits, 1.0, top_p=0.1) == torch.tensor([1.0, 0, 0, 0])).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_is_torch_argmax_with_ties_and_nan(dtype):
    torch.manual_seed(0)
    x = torch.randint(0, 3, (64, 4099)).to(dtype)  # every row has many tied maxima
    x[5, 11] = x[5, 700] = float("nan")
    assert torch.equal(argmax(x), x.argmax(-1))
    assert argmax(x).tolist()[5] == 11
    assert all(int(argmax(row)) == int(row.argmax()) for row in x[:8])


def test_greedy_accept_walks_argmax():
    # root -> a(5), b(6); a -> c(7). Target argmax: root 6, b 7 (no child of b) -> path [0, 2], bonus 7.
    tree = DraftTree([1, 5, 6, 7], [-1, 0, 0, 1], [0, 1, 1, 2], [-1, 0, 1, 2])
    logits = torch.zeros(4, 10)
    logits[0, 6] = logits[2, 7] = logits[1, 7] = logits[3, 3] = 1.0
    assert greedy_accept(tree, logits) == ([0, 2], 7)
    logits[0] = 0
    logits[0, 5] = 1  # root picks a, a picks c, c's argmax 3 is the bonus
    assert greedy_accept(tree, logits) == ([0, 1, 3], 3)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_recursive_rejection_sampling_outputs_p(k):
    """Candidates drawn without replacement from q, verified in draw order: the output follows p."""
    gen = torch.Generator().manual_seed(k)
    p = torch.tensor([0.05, 0.4, 0.0, 0.25, 0.3, 0.0])
    q = torch.tensor([0.3, 0.1, 0.3, 0.05, 0.05, 0.2])
    n = 6000
    counts, first_accepted = torch.zeros(6), 0
    for _ in range(n):
        cands = gumbel_pick(q.log()[None], k, gen)[0][0].tolist()
        i, tok = verify_node(p, q, cands, gen)
        counts[tok] += 1
        first_accepted += i == 0
    assert counts[2] == counts[5] == 0
    assert chi2_pvalue(counts, p) > 1e-3
    # the first candidate is accepted with probability sum(min(p, q))
    assert abs(first_accepted / n - torch.minimum(p, q).sum().item()) < 4 * (0.25 / n) ** 0.5


def test_gumbel_pick_draws_without_replacement():
    gen = torch.Generator().manual_seed(0)
    q = torch.tensor([0.6, 0.3, 0.1, 0.0])
    first, second = torch.zeros(4), torch.zeros(4)
    for _ in range(4000):
        tok, score = gumbel_pick(q.log()[None], 4, gen)
        tok, score = tok[0].tolist(), score[0].tolist()
        assert len(set(tok)) == 4 and tok[-1] == 3 and score[-1] == float("-inf") and score[0] > score[1] > score[2]
        first[tok[0]] += 1
        second[tok[1]] += 1
    assert chi2_pvalue(first, q) > 1e-3
    # P(second = j) = sum_i q_i q_j / (1 - q_i)
    p2 = torch.tensor([sum(q[i] * q[j] / (1 - q[i]) for i in range(3) if i != j) for j in range(4)])
    assert chi2_pvalue(second, p2) > 1e-3


def test_sample_accept_on_a_stub_tree():
    """Two levels: the distribution of (first, second) emitted tokens equals p(x1) p(x2 | x1)."""
    V, gen = 3, torch.Generator().manual_seed(1)
    p_root = torch.tensor([0.5, 0.3, 0.2])
    p_next = torch.tensor([[0.1, 0.1, 0.8], [0.6, 0.2, 0.2], [0.3, 0.3, 0.4]])  # p(x2 | x1)
    q_root, q_next = torch.tensor([0.2, 0.2, 0.6]), torch.tensor([0.4, 0.4, 0.2])
    counts = torch.zeros(V, V)
    for _ in range(6000):
        kids = gumbel_pick(q_root.log()[None], 2, gen)[0][0].tolist()
        grand = gumbel_pick(q_next.log()[None], 1, gen)[0][0].tolist()  # one child below the first kid
        tree = DraftTree([0, kids[0], kids[1], grand[0]], [-1, 0, 0, 1], [0, 1, 1, 2], [-1, 0, 1, 2])
        tp = torch.stack([p_root, p_next[kids[0]], p_next[kids[1]], torch.full((V,), 1 / V)])
        path, bonus = sample_accept(tree, tp, {0: q_root, 1: q_next}, gen)
        toks = [tree.tokens[i] for i in path[1:]] + [bonus]
        if len(toks) == 1:  # nothing accepted: draw x2 from the target like the next forward would
            toks.append(int(torch.multinomial(p_next[toks[0]], 1, generator=gen)))
        counts[toks[0], toks[1]] += 1
    assert chi2_pvalue(counts.flatten(), (p_root[:, None] * p_next).flatten()) > 1e-3


# ---- end to end: a small-vocabulary target ------------------------------------------------------

SMALL = {
    "name": "v8",
    "source": "random",
    "seed": 3,
    "random_config": {
        "vocab_size": 8,
        "hidden_size": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    },
}


@torch.no_grad()
def exact_distribution(target, prompt: list[int], steps: int, temperature: float, top_p: float) -> torch.Tensor:
    """P(continuation) for every continuation of `steps` tokens, by enumeration; flat index base V."""
    V = target.config.vocab_size
    out = torch.ones(1, dtype=torch.float64)
    for s in range(steps):
        conts = list(itertools.product(range(V), repeat=s))
        ids = torch.tensor([prompt + list(c) for c in conts])
        p = probs(target.model.logits(target.model(ids)[:, -1]), temperature, top_p).double()  # (V^s, V)
        out = (out[:, None] * p).flatten()
    return out


@pytest.mark.slow  # thousands of sampled generations
@pytest.mark.parametrize(
    "cfg,draft_vocab",
    [
        (InferConfig(budget=6, depth=3, top_k=2, temperature=1.0, max_new_tokens=3), None),
        (InferConfig(budget=3, depth=3, top_k=1, temperature=0.7, top_p=0.9, max_new_tokens=3), None),
        (InferConfig(budget=6, depth=3, top_k=2, temperature=1.0, max_new_tokens=3), 5),
    ],
    ids=["tree-T1", "chain-T0.7-p0.9", "tree-T1-draft-vocab-5-of-8"],
)
def test_speculative_sampling_matches_target_distribution(cfg, draft_vocab):
    """Lossless sampling, also when the draft proposes from a reduced vocabulary (its q rows are zero
    outside it: the target still samples every token with its own probability)."""
    target = load_target(SMALL)
    torch.manual_seed(0)
    draft = DraftModel(DraftConfig.from_target(target.config, depth=1))
    counts = torch.tensor([9, 1, 8, 7, 2, 6, 5, 3])  # draft vocabulary: tokens 0, 2, 3, 5, 6
    eng = Dovetail(target, draft, "cpu", draft_vocab=draft_vocab, token_counts=counts)
    assert draft_vocab is None or eng.draft_side.d2t.tolist() == [0, 2, 3, 5, 6]
    prompt = [1, 4, 2, 7]
    exact = exact_distribution(target, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    n, V = 3000, target.config.vocab_size
    counts, accepted = torch.zeros_like(exact), 0
    for i in range(n):
        cfg.seed = i
        r = eng.generate(prompt, cfg)
        counts[sum(t * V**j for j, t in enumerate(reversed(r.output_ids)))] += 1
        accepted += sum(r.accept_lengths)
    assert accepted > 0.1 * n  # rejections and acceptances both happen: the test exercises both paths
    assert chi2_pvalue(counts, exact) > 1e-3


@pytest.mark.slow  # thousands of sampled generations
@pytest.mark.parametrize("with_draft", [False, True], ids=["target-only", "draft"])
def test_sampling_with_lookup_matches_target_distribution(with_draft):
    """Looked-up tokens are proposed with certainty (q one-hot): accepted with the target's probability, and
    on rejection the target samples from its distribution without that token; the output stays exact."""
    target = load_target(SMALL)
    torch.manual_seed(0)
    draft = DraftModel(DraftConfig.from_target(target.config, depth=1)) if with_draft else None
    eng = Dovetail(target, draft, "cpu")
    prompt = torch.randint(0, 8, (40,), generator=torch.Generator().manual_seed(1)).tolist()  # ~29 of 64 bigrams
    cfg = InferConfig(budget=2, depth=2, top_k=1, temperature=0.8, max_new_tokens=3, lookup=3)
    exact = exact_distribution(target, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    n, V = 3000, target.config.vocab_size
    counts, fired, accepted = torch.zeros_like(exact), 0, 0
    for i in range(n):
        cfg.seed = i
        r = eng.generate(prompt, cfg)
        counts[sum(t * V**j for j, t in enumerate(reversed(r.output_ids)))] += 1
        fired, accepted = fired + r.lookup_forwards, accepted + r.lookup_accepted
    assert fired > 0.2 * n and 0.05 * fired < accepted < 2 * fired  # both acceptances and rejections happen
    assert chi2_pvalue(counts, exact) > 1e-3
