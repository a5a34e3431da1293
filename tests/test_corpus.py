"""Batched target answers with features (mirror/training/corpus.py): finished rows leave the
batch, and every row still gets exactly what decoding it alone gives."""
import torch

from helpers import tiny_model
from mirror.training.corpus import generate_with_features


def test_batched_answers_match_single_rows_when_rows_finish_early():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 7)]
    free = generate_with_features(model, prompts, 12, set(), [2], top_k=4)
    # an "eos" that some answers reach early and others never: rows finish at different steps
    eos = {int(free[1].ids[free[1].n_prompt + 2])}
    batched = generate_with_features(model, prompts, 12, eos, [2], top_k=4)
    lengths = set()
    for p, b in zip(prompts, batched):
        alone = generate_with_features(model, [p], 12, eos, [2], top_k=4)[0]
        assert b.ids.tolist() == alone.ids.tolist()
        assert torch.equal(b.top_ids, alone.top_ids)
        torch.testing.assert_close(b.hidden[2].float(), alone.hidden[2].float(), atol=1e-3, rtol=2e-3)
        lengths.add(len(b.ids) - len(p))
    assert len(lengths) > 1  # the case under test: some rows stopped before others
