"""train.distributed at drop time, the slots the supervisor reserves and the command it starts: torch-free, no
child processes."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon.config import DaemonSettings
from daemon.launch import gpu_slots_wanted, ranks_here, stage_command
from daemon.layout import Layout
from daemon.store import Store
from daemon.supervisor import Supervisor
from trainbox.jobspec import JobSpec, TrainSpec
from trainbox.preflight import check_job


def job(stages: list[str] | None = None, **train) -> JobSpec:
    return JobSpec.model_validate({"name": "j", "datasets": ["d.jsonl"], "train": train,
                                   **({"stages": stages} if stages else {})})


def problems(spec: JobSpec, gpus: int) -> dict[str, str]:
    return {p.key: f"{p.message} | {p.fix}" for p in check_job(spec, gpus)}


def test_fsdp_runs_lora_on_several_ranks_and_rejects_qlora_and_one_process_with_the_fix():
    assert problems(job(distributed={"devices": 2, "strategy": "fsdp"}), gpus=2) == {}
    assert problems(job(device="cpu", distributed={"devices": 2, "strategy": "fsdp"}), gpus=0) == {}
    qlora = problems(job(method="qlora", distributed={"devices": 2, "strategy": "fsdp"}), gpus=2)
    assert "4-bit" in qlora["train.distributed.strategy"] and "method: lora" in qlora["train.distributed.strategy"]
    alone = problems(job(distributed={"strategy": "fsdp"}), gpus=1)["train.distributed.strategy"]
    assert "in one" in alone and "devices to 2 or more" in alone


def test_cpu_ranks_are_allowed_and_gpu_ranks_need_the_gpus():
    assert problems(job(device="cpu", distributed={"devices": 2}), gpus=0) == {}
    assert problems(job(distributed={"devices": 2}), gpus=2) == {}
    assert problems(job(distributed={"devices": "all"}), gpus=4) == {}
    too_many = problems(job(distributed={"devices": 4}), gpus=2)["train.distributed.devices"]
    assert "needs 4 GPU(s)" in too_many and "at most 2" in too_many
    no_gpu = problems(job(distributed={"devices": 2}), gpus=0)["train.distributed.devices"]
    assert "train.device: cpu" in no_gpu
    assert "give a number" in problems(job(device="cpu", distributed={"devices": "all"}), 0)["train.distributed.devices"]
    assert "pins one GPU" in problems(job(device="cuda:1", distributed={"devices": 2}), gpus=2)["train.device"]


def test_machines_other_than_node_0_only_train():
    several = {"devices": 2, "nnodes": 2, "node_rank": 1, "rdzv_endpoint": "10.0.0.1:29400"}
    assert "stages: [prepare, train]" in problems(job(distributed=several), gpus=2)["stages"]
    assert problems(job(["prepare", "train"], distributed=several), gpus=2) == {}


@pytest.mark.parametrize("distributed, message", [
    ({"nnodes": 2}, "needs rdzv_endpoint"),
    ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "must be below nnodes"),
    ({"devices": 0}, "at least 1"),
    ({"nnodes": 2, "rdzv_endpoint": "no-port"}, "host:port"),
])
def test_schema_errors_say_what_to_write(distributed, message):
    with pytest.raises(ValidationError, match=message):
        TrainSpec.model_validate({"distributed": distributed})


def test_one_machine_uses_a_standalone_rendezvous_and_the_stage_module():
    train = TrainSpec.model_validate({"device": "cpu", "distributed": {"devices": 2}})
    command = stage_command("train", Path("/h/jobs/x/train"), train, ranks_here(train, ["cpu"]), "x", 60)
    assert command[:3] == [sys.executable, "-m", "handlers.torchrun"]
    assert "--nproc-per-node=2" in command and "--standalone" in command and "--shutdown-timeout=60" in command
    assert command[-4:] == ["-m", "handlers", "train", "/h/jobs/x/train"]
    # only the train stage is distributed; a one-process job is started as before
    assert stage_command("evaluate", Path("/d"), train, 1, "x", 60) == [sys.executable, "-m", "handlers", "evaluate",
                                                                         "/d"]
    assert stage_command("train", Path("/d"), TrainSpec(), 1, "x", 60)[1:3] == ["-m", "handlers"]


def test_several_machines_use_a_static_rendezvous_so_node_0_holds_rank_0():
    train = TrainSpec.model_validate({"distributed": {"devices": "all", "nnodes": 2, "node_rank": 1,
                                                      "rdzv_endpoint": "10.0.0.1:29400"}})
    assert gpu_slots_wanted("train", train, gpu_slots=4) == 4 and gpu_slots_wanted("export", train, 4) == 1
    command = stage_command("train", Path("/d"), train, ranks_here(train, ["cuda:0", "cuda:1"]), "shared-name", 30)
    for arg in ("--nproc-per-node=2", "--nnodes=2", "--node-rank=1", "--rdzv-backend=static",
                "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=shared-name"):
        assert arg in command


def test_the_supervisor_reserves_one_gpu_slot_per_rank_and_one_slot_for_other_stages(tmp_path):
    layout = Layout(tmp_path)
    layout.create()
    supervisor = Supervisor(layout, Store.for_home(tmp_path), DaemonSettings(), [0, 1, 2], lambda *a, **k: None)
    two = TrainSpec.model_validate({"distributed": {"devices": 2}})
    assert supervisor._free_slots("train", two) == ["cuda:0", "cuda:1"]
    assert supervisor._free_slots("evaluate", two) == ["cuda:0"]
    assert supervisor._free_slots("train", TrainSpec.model_validate({"distributed": {"devices": "all"}})) == [
        "cuda:0", "cuda:1", "cuda:2"]
    assert supervisor._free_slots("train", TrainSpec.model_validate({"distributed": {"devices": 4}})) is None
    cpu_ranks = TrainSpec.model_validate({"device": "cpu", "distributed": {"devices": 2}})
    assert supervisor._free_slots("train", cpu_ranks) == ["cpu"]
    assert ranks_here(cpu_ranks, ["cpu"]) == 2 and ranks_here(two, ["cuda:0", "cuda:1"]) == 2
