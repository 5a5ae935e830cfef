"""Admission control: never more tenants in flight than adapter slots; the rest wait in order."""

import time

from engine.config import EngineConfig
from engine.core import Engine
from tests.modelpaths import model_dir, tiny_spec


def test_tenants_beyond_the_slots_wait_queued_in_order(tmp_path):
    eng = Engine(EngineConfig(model=model_dir(), backend="peft", max_loras=1), tmp_path)
    eng.warm_up()
    try:
        first = eng.submit(tiny_spec("first", steps=3))["id"]
        second = eng.submit(tiny_spec("second", steps=2))["id"]
        seen_queued = False
        deadline = time.time() + 120
        while eng.tenants[second].state.value != "done" and time.time() < deadline:
            in_flight = [t for t in eng.tenants.values() if t.state.value in ("warming", "running")]
            assert len(in_flight) <= 1
            if eng.tenants[second].state.value == "queued" and eng.tenants[first].state.value == "running":
                seen_queued = True
                assert "waiting for an adapter slot" in eng.tenants[second].reason
            time.sleep(0.02)
        assert seen_queued and eng.tenants[first].state.value == "done"
        assert eng.tenants[second].state.value == "done"
        assert eng.tenants[second].first_step >= eng.store.experiments()[0]["finished"]
    finally:
        eng.shutdown()
