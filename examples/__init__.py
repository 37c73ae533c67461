"""Runnable end-to-end examples: docqa_fast under a real transformers Qwen2.5-VL.

Each runs as ``python -m examples.<name> [--tiny] [--steps N]`` from the repository root and
checks itself against the plain stack (transformers' eager attention, logits, PyTorch losses):

* :mod:`examples.long_doc_sft` -- supervised fine-tuning on packed documents of page images;
* :mod:`examples.longpo_step` -- LongPO: the policy on the whole document, the frozen reference
  on a short chunk of it;
* :mod:`examples.reward_best_of_n` -- a reward-model ensemble: K heads, best-of-n, ranking losses;
* :mod:`examples.serve_long_doc` -- chunked prefill into a paged KV cache and greedy decoding;
* :mod:`examples.context_parallel_step` -- one training step with the text model's attention
  context-parallel over 2-4 processes (``--nproc``, ``--ulysses``, ``--fsdp``; or torchrun).

``docs/examples.md`` walks through them (``docs/distributed.md`` the last); ``tests/examples/``
and ``tests/distributed/`` run their checks.
"""
