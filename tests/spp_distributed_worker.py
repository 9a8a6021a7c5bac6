"""Worker for tests/test_spp.py::test_two_processes_record_the_same_path, run by
``python -m torch.distributed.run --nproc_per_node 2`` (two CPU processes, gloo): each rank runs the same SPP
search under Trainer/accelerate and dumps its path; the test compares them. Also records which rank saved."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import transformers as T  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from spp_digits import Digits, digits, tiny_vit  # noqa: E402

from hf_prune import SolutionPath, SPPConfig  # noqa: E402
from hf_prune.callbacks import SolutionPathCallback  # noqa: E402
from hf_prune.methods.spp import attach_masks  # noqa: E402

out = sys.argv[1]
rank = int(os.environ.get("RANK", "0"))
original_save = SolutionPath.save_pretrained


def spying_save(self, folder, **kwargs):
    with open(os.path.join(out, f"saved_by_rank{rank}"), "w") as fh:
        fh.write(str(folder))
    return original_save(self, folder, **kwargs)


SolutionPath.save_pretrained = spying_save
torch.set_num_threads(1)
x, y = digits()
model = tiny_vit(0)
config = SPPConfig(lr=1e-2, lam=0.05, record_every=2, coupling="released", share_across_heads=False)
attach_masks(model, config)
args = config.training_arguments(os.path.join(out, "run"), max_steps=12, per_device_train_batch_size=16,
                                 save_strategy="no", seed=0, disable_tqdm=True, use_cpu=True, report_to="none")
callback = SolutionPathCallback()
trainer = T.Trainer(model=model, args=args, train_dataset=Digits(x, y, 256), callbacks=[callback])
trainer.train()
save_file({k: v.contiguous() for k, v in callback.path.tensors.items()},
          os.path.join(out, f"path_rank{rank}.safetensors"))
with open(os.path.join(out, f"info_rank{rank}.json"), "w") as fh:
    json.dump({"world_size": trainer.args.world_size, "search": callback.path.search}, fh)
