"""One process of the sharded-training tests in tests/test_training.py, started twice by torchrun on CPU (gloo).

FSDP and DeepSpeed start under accelerate only on an accelerator, so this drives the pieces they use by hand:
  fsdp       the launcher turns the accelerate config into its FSDP_* environment, accelerate's plugin reads it,
             and accelerate's `fsdp2_prepare_model` shards the model exactly as `Accelerator.prepare` would;
  deepspeed  the DeepSpeed json the accelerate config names, its "auto" values filled by transformers'
             `HfTrainerDeepSpeedConfig` as the Trainer does, then `deepspeed.initialize` (ZeRO, CPU accelerator).
Either way a tiny VLoRA model in stage finetune takes one step: forward and backward on this process's half of
a fixed batch, then SGD (lr 0.1). The main process saves its loss, the sharded unit classes (fsdp) and the full
state dict after the step.

usage: torchrun --standalone --nproc_per_node 2 tests/sharded_worker.py fsdp|deepspeed ACCELERATE_YAML BATCH OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
LR = 0.1


def fsdp_prepare(model, config_file: str, rank: int):
    """The model sharded as `accelerate launch --config_file config_file` would shard it.

    Returns (model, backward(loss), optimizer step, full state dict getter, sharded unit classes), as
    `deepspeed_prepare` does."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import FSDPModule

    dist.init_process_group("gloo")
    args = _validate_launch_command(launch_command_parser().parse_args(["--config_file", config_file, "x.py"]))[0]
    os.environ.update({k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith("FSDP_")})
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2, plugin.fsdp_version
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                  parallelism_config=None, mixed_precision="no", is_main_process=rank == 0,
                                  device=torch.device("cpu"))
    model = fsdp2_prepare_model(accelerator, model)
    units = sorted({type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule)})
    step = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR).step

    def state():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    return model, lambda loss: loss.backward(), step, state, units


def deepspeed_prepare(model, config_file: str, rows: int):
    """The model in a DeepSpeed engine configured as transformers.Trainer configures it; returns what
    `fsdp_prepare` returns (no unit classes)."""
    import deepspeed
    import yaml
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="gloo")
    json_file = yaml.safe_load(Path(config_file).read_text())["deepspeed_config"]["deepspeed_config_file"]
    args = TrainingArguments(output_dir=os.environ.get("TMPDIR", "/tmp"), per_device_train_batch_size=rows,
                             learning_rate=LR, max_grad_norm=0.0, use_cpu=True, report_to="none")
    ds_config = HfTrainerDeepSpeedConfig(str(REPO / json_file))
    ds_config.trainer_config_process(args)
    assert ds_config.config["zero_optimization"]["stage"] == 2
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=LR),
                                      model_parameters=params, config=ds_config.config)
    return engine, engine.backward, engine.step, engine.module.state_dict, []


def main(mode: str, config_file: str, batch_file: str, out_file: str) -> None:
    from tiny import tiny_model
    from vlora_hf.training.stages import apply_stage

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model = tiny_model(seed=0).train()
    apply_stage(model, "finetune")
    batch = torch.load(batch_file)
    rows = batch["input_ids"].shape[0] // world
    if mode == "fsdp":
        model, backward, step, state, units = fsdp_prepare(model, config_file, rank)
    else:
        model, backward, step, state, units = deepspeed_prepare(model, config_file, rows)
    loss = model(**{k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}).loss
    backward(loss)
    step()
    full = state()
    if rank == 0:
        torch.save({"loss": loss.detach(), "units": units, "state": full}, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
