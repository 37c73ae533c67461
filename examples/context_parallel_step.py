"""One training step of a tiny random Qwen2.5-VL with its language model context-parallel.

    python -m examples.context_parallel_step                 # spawns 2 CPU processes (gloo)
    python -m examples.context_parallel_step --nproc 4 --ulysses 2
    torchrun --nproc-per-node 4 -m examples.context_parallel_step --ulysses 2   # NCCL on GPUs

A packed row of documents (page images as random patches, question and answer tokens) goes
through the vision tower whole on every rank; the merged embeddings, the M-RoPE position ids
(3 rows), the shifted labels are sharded (zigzag ring across ranks, Ulysses inside groups of
``--ulysses``); the text model runs on each shard with ``attn_implementation="docqa_fast_cp"``,
its attention alone exchanging keys and values; the loss is the global token mean. With
``--fsdp`` the model is wrapped with FSDP2's ``fully_shard`` over all ranks, which averages the
gradients; without it they are averaged by hand. Rank 0 prints the loss next to the
single-process loss of the same weights and batch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket

import torch
import torch.distributed as dist

from docqa_fast.distributed import ContextParallel, setup_context_parallel
from docqa_fast.distributed.transformers import NAME, context_parallel, register, sequence_loss, shard_batch
from docqa_fast.packing import get_rope_index

from ._common import MERGE, PATCH_DIM, TINY, TOKENIZER, model_config

GRID = (1, 4, 4)  # one page: 16 patches, 4 tokens after the 2x2 merge
SINGLE = ContextParallel.single()  # no parallelism: the same code on one process


def make_batch(seed: int, total: int = 64, documents: int = 3) -> dict:
    """A packed row of ``documents`` (page tokens, question, answer) padded by a last ignored
    document to ``total`` tokens; pixel values are random patches."""
    generator = torch.Generator().manual_seed(seed)
    page_tokens = GRID[0] * GRID[1] * GRID[2] // MERGE ** 2
    ids, labels, types, positions, lengths = [], [], [], [], []
    for _ in range(documents):
        prompt = [TOKENIZER.vision_start_id] + [TOKENIZER.image_id] * page_tokens + [TOKENIZER.vision_end_id]
        prompt += torch.randint(8, 60, (5,), generator=generator).tolist()
        answer = torch.randint(8, 60, (4,), generator=generator).tolist() + [TOKENIZER.eos_id]
        doc = torch.tensor(prompt + answer)
        doc_types = (doc == TOKENIZER.image_id).to(torch.int32)
        pos, _ = get_rope_index(doc[None], doc_types[None], torch.tensor([GRID]), spatial_merge_size=MERGE)
        ids.append(doc), types.append(doc_types), positions.append(pos)
        labels.append(torch.tensor([-100] * len(prompt) + answer))
        lengths.append(len(doc))
    pad = total - sum(lengths)
    if pad < 1:
        raise ValueError(f"expected total > {sum(lengths)} tokens for {documents} documents, got {total}")
    ids.append(torch.full((pad,), TOKENIZER.pad_id)), types.append(torch.zeros(pad, dtype=torch.int32))
    positions.append(torch.arange(pad).view(1, 1, -1).expand(3, 1, -1)), labels.append(torch.full((pad,), -100))
    lengths.append(pad)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(positions, dim=-1), "cu_seqlens": cu,
            "pixel_values": torch.randn(documents * GRID[1] * GRID[2], PATCH_DIM, generator=generator),
            "image_grid_thw": torch.tensor([GRID] * documents)}


def build_model(seed: int, dtype=torch.float32):
    """The tiny Qwen2.5-VL: the text model on ``"docqa_fast_cp"``, the vision tower on ``"docqa_fast"``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    register()
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(model_config(TINY), dtype=dtype)
    model.set_attn_implementation({"text_config": NAME, "vision_config": "docqa_fast"})
    return model


def _image_embeddings(model, pixel_values, grid):
    features = model.model.get_image_features(pixel_values.to(model.dtype), grid)
    features = getattr(features, "pooler_output", features)  # transformers >= 5.2x returns a model output
    return torch.cat(list(features), dim=0) if isinstance(features, (list, tuple)) else features


def step_loss(model, batch: dict, layout: ContextParallel) -> torch.Tensor:
    """The global mean loss of ``batch`` with the text model over ``layout``; backward-able."""
    embeds = model.get_input_embeddings()(batch["input_ids"])
    image = (batch["input_ids"] == TOKENIZER.image_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(image, _image_embeddings(model, batch["pixel_values"], batch["image_grid_thw"]))
    local = shard_batch(layout, inputs_embeds=embeds, position_ids=batch["position_ids"], labels=batch["labels"],
                        cu_seqlens=batch["cu_seqlens"])
    with context_parallel(layout):
        hidden = model.model.language_model(inputs_embeds=local["inputs_embeds"], position_ids=local["position_ids"],
                                            **local["attention_kwargs"]).last_hidden_state
    return sequence_loss(model.lm_head(hidden), local["labels"], layout)


class StepLoss(torch.nn.Module):
    """:func:`step_loss` as a module's forward: FSDP2 needs a root module whose forward runs the
    rest (the units below it gather their parameters in their own forwards)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, layout):
        return step_loss(self.model, batch, layout)


def average_gradients(model, group) -> None:
    """What DDP / FSDP do over the context-parallel ranks: the mean of their gradients."""
    world = dist.get_world_size(group)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad /= world


def fsdp_wrap(model):
    """FSDP2 over all ranks, rooted at a :class:`StepLoss`. Every module :func:`step_loss` calls is its own unit (a unit
    gathers its parameters in its own forward): each decoder layer, the token embedding, the
    rest of the text model, the vision tower and the LM head."""
    from torch.distributed.fsdp import fully_shard

    text = model.model.language_model
    for module in (*text.layers, text.embed_tokens, text, model.model.visual, model.lm_head):
        fully_shard(module)
    return fully_shard(StepLoss(model))


def train_step(model, optimizer, batch, layout, fsdp: bool) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(batch, layout)
    loss.backward()
    if not fsdp:
        average_gradients(model, layout.cp_group)
    optimizer.step()
    return loss.item()


def run(ulysses: int, fsdp: bool, seed: int = 0) -> float:
    """The step on this rank of an initialised default group; returns the loss."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ulysses:
        raise ValueError(f"expected --ulysses to divide the world size {world}, got {ulysses}")
    layout = setup_context_parallel(ulysses, world // ulysses, timeout=datetime.timedelta(seconds=120))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    model = build_model(seed).to(device)
    batch = {k: v.to(device) for k, v in make_batch(seed).items()}
    if rank == 0:
        with torch.no_grad():
            single = step_loss(model, batch, SINGLE).item()
    model = fsdp_wrap(model) if fsdp else StepLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = train_step(model, optimizer, batch, layout, fsdp)
    if rank == 0:
        print(f"{world} ranks (Ulysses {ulysses} x ring {world // ulysses}{', FSDP2' if fsdp else ''}): "
              f"loss {loss:.6f}, single process {single:.6f}")
    return loss


def _spawned(rank, world, port, ulysses, fsdp):
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=120))
    try:
        run(ulysses, fsdp)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.context_parallel_step",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun (CPU, gloo)")
    parser.add_argument("--ulysses", type=int, default=1, help="Ulysses degree (the rest of the ranks form the ring)")
    parser.add_argument("--fsdp", action="store_true", help="wrap the model with FSDP2's fully_shard")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
        try:
            run(args.ulysses, args.fsdp)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(args.nproc, port, args.ulysses, args.fsdp), nprocs=args.nproc)


if __name__ == "__main__":
    main()
