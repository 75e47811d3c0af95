"""Run by tests/test_expert_parallel.py under torchrun (gloo): our MoE with experts sharded over EP ranks against
the unsharded MoE, for a few SGD steps on the same data.

Every rank builds the same full MoE (same seed) and the inputs of every rank (seeded by rank). The reference
(computed on every rank, no communication) runs the full MoE on all ranks' inputs, averages the per-rank losses and
takes SGD steps. The expert-parallel model keeps this rank's experts, runs only its own input through the
all-to-all dispatch, averages non-expert gradients over all ranks and expert gradients over the expert-data-parallel
group (divided by the world size, as DeepSpeed does). After every step the losses, the input gradients and all
parameters (expert shards gathered) must agree. Usage: ep_worker.py EP OPTIONS_JSON
"""

import copy
import json
import sys

import torch
import torch.distributed as dist

from tml.model import MoE, MoEConfig
from tml.parallel.expert import shard_experts

DIM, HIDDEN, E, B, T, STEPS, LR = 16, 32, 8, 2, 6, 3, 0.2


def main() -> None:
    ep, opts = int(sys.argv[1]), json.loads(sys.argv[2])
    import deepspeed  # its groups module (DeepSpeed's EP groups) needs DeepSpeed's comm initialised

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = MoE(DIM, MoEConfig(hidden_dim=HIDDEN, num_experts=E, **opts))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(std=0.1)
    moe = copy.deepcopy(ref)
    xs = [torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
    rs = [torch.randn(B, T, DIM, generator=torch.Generator().manual_seed(200 + r)) for r in range(world)]

    class Holder(torch.nn.Module):  # shard_experts walks a model
        def __init__(self):
            super().__init__()
            self.moe = moe

    holder = Holder()
    shard_experts(holder, ep)
    from deepspeed.utils import groups

    edp = groups._get_expert_data_parallel_group(f"ep_size_{ep}")
    local = E // ep
    lo = groups._get_expert_parallel_rank(f"ep_size_{ep}") * local
    assert moe.experts.w1.shape == (local, HIDDEN, DIM) and not moe.experts.w1.allreduce

    for step in range(STEPS):
        # reference: mean over ranks of (output . r + aux), full experts
        ref.zero_grad()
        ref_losses, ref_xgrad = [], None
        for r in range(world):
            x = xs[r].clone().requires_grad_(True)
            loss = ((ref(x) * rs[r]).sum() + ref.last_aux_loss) / world
            loss.backward()
            ref_losses.append(loss.item() * world)
            if r == rank:
                ref_xgrad = x.grad
        # expert parallel: this rank's data only
        moe.zero_grad()
        x = xs[rank].clone().requires_grad_(True)
        loss = ((moe(x) * rs[rank]).sum() + moe.last_aux_loss) / world
        loss.backward()
        torch.testing.assert_close(loss.item() * world, ref_losses[rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, ref_xgrad, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {m}")
        for p in moe.parameters():
            if getattr(p, "allreduce", True):
                dist.all_reduce(p.grad)  # the loss is already divided by world: the sum is the mean's gradient
            else:
                dist.all_reduce(p.grad, group=edp)  # sum over the ranks holding the same experts
        with torch.no_grad():
            for m in (ref, moe):
                for p in m.parameters():
                    p -= LR * p.grad
        # compare every parameter; expert shards against the reference's slice
        for (name, p), (_, q) in zip(moe.named_parameters(), ref.named_parameters()):
            want = q[lo:lo + local] if name.startswith("experts.") else q
            torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-6, msg=f"step {step} rank {rank} {name}")
    dist.barrier()
    if rank == 0:
        print(f"EP{ep} OK over {STEPS} steps", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
