"""`draft.colocate` (deploy/local_colocated.yaml): no draft worker, the draft inside the target
worker's process on its cores - still exact, and really drafting."""
from pathlib import Path

import pytest
import ray

from mirror.engine import GenerateArgs
from mirror.runtime.cluster import DistributedEngine
from mirror.runtime.config import DeploymentConfig
from mirror.sampling import SamplingParams
from mirror.spec_config import SpecConfig

from test_runtime import PROMPT, run

pytestmark = pytest.mark.xdist_group("ray")
CONFIG = str(Path(__file__).resolve().parent.parent / "deploy" / "local_colocated.yaml")


@pytest.fixture(scope="module")
def engine():
    eng = DistributedEngine(DeploymentConfig.load(CONFIG))
    yield eng
    eng.runtime.shutdown()
    ray.shutdown()


def test_one_worker_on_both_cores_and_no_draft_actor(engine):
    info = engine.runtime.info()
    assert info["draft"] == "colocated" and engine.runtime.draft is None
    assert len(engine.runtime.pg.bundle_specs) == 1  # the target's bundle only
    t = info["target"][0]
    assert t["placement"]["cores"] == [0, 1] and t["placement"]["threads"] == 2


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_colocated_draft_is_lossless_and_drafts(engine, method):
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    base = engine.default_spec
    ref, _ = run(engine, GenerateArgs(ids, params, SpecConfig(method="ar")))
    out, _ = run(engine, GenerateArgs(ids, params, SpecConfig.from_dict({**base.to_dict(), "method": method})))
    assert out == ref and len(out) == 48
    final = engine.completed[-1]
    assert final["degraded"] is None
    m = final["metrics"]
    assert m["drafted_tokens"] > 0 and m["tau"] > 1.5
    src = m["extra"]["windows_by_source"]  # the gguf network drafted in the target's process too
    assert sum(v for k, v in src.items() if k != "ngram") > 0, src
