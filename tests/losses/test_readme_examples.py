"""The README's losses examples, verbatim, run on every backend here.

Keep ``LONGPO_STEP`` and ``REPLACING_A_TRAINER_LOSS`` identical to the code blocks of the
README's "Fused linear log-probs and preference losses" section.

The examples make their tensors with plain ``torch.randn`` / ``nn.Linear``: CPU tensors
as printed. They run here with the test device as PyTorch's default device, so that a
backend forced through ``DOCQA_FAST_BACKEND`` gets tensors it can run -- on a GPU machine
the Triton backend takes CUDA tensors only (the interpreter is off there).
"""

import pytest
import torch

pytestmark = pytest.mark.backends("reference", "triton")

REPLACING_A_TRAINER_LOSS = '''
import torch
import torch.nn.functional as F
from docqa_fast.losses import linear_cross_entropy, sequence_logprobs

torch.manual_seed(0)
vocab, hidden_size = 1000, 64
lm_head = torch.nn.Linear(hidden_size, vocab, bias=False)
hidden = torch.randn(2, 33, hidden_size, requires_grad=True)  # the decoder's last hidden states
input_ids = torch.randint(0, vocab, (2, 33))
labels = input_ids.clone()
labels[:, :10] = -100                                          # prompt tokens do not count

# transformers' causal-LM loss: logits for every token, then cross-entropy.
logits = lm_head(hidden)                                       # (B, T, V): 37 GiB at 128K x 152K in bf16
naive = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
# The same loss and gradients from the hidden states and the head weight, no logits:
fused = linear_cross_entropy(hidden[:, :-1], lm_head.weight, labels[:, 1:])
torch.testing.assert_close(fused, naive)

# TRL's sequence log-probs (log_softmax -> gather -> masked sum over the answer):
per_token = torch.gather(logits[:, :-1].log_softmax(-1), 2, labels[:, 1:].clamp_min(0).unsqueeze(2)).squeeze(2)
trl_logps = (per_token * (labels[:, 1:] != -100)).sum(-1)
logps = sequence_logprobs(hidden[:, :-1], lm_head.weight, labels[:, 1:])
torch.testing.assert_close(logps, trl_logps)
'''

LONGPO_STEP = '''
import copy
import torch
from torch import nn
from docqa_fast.losses import FusedLinearLongPOLoss, sequence_logprobs


class TinyLM(nn.Module):
    """A random-weight causal LM: embeddings, two pre-norm transformer layers, an LM head."""

    def __init__(self, vocab=1000, hidden=64, layers=2, heads=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def hidden_states(self, input_ids):
        mask = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1])
        return self.norm(self.layers(self.embed(input_ids), mask=mask, is_causal=True))


def answer_hidden(model, context, answer):
    """Hidden states that predict the answer tokens after ``context`` (position t predicts t + 1)."""
    states = model.hidden_states(torch.cat([context, answer], dim=1))
    return states[:, context.shape[1] - 1:-1]


torch.manual_seed(0)
policy = TinyLM()
reference = copy.deepcopy(policy).requires_grad_(False)  # frozen
long_context = torch.randint(0, 1000, (2, 256))          # the whole document (128K tokens in real runs)
short_context = long_context[:, -64:]                    # the short chunk the reference reads (<= 32K)
chosen = torch.randint(0, 1000, (2, 12))                 # answers: the short-context model's own ...
rejected = torch.randint(0, 1000, (2, 12))               # ... and the long-context model's
loss_fn = FusedLinearLongPOLoss(beta=0.01, lam=0.01)
optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)

with torch.no_grad():                                    # reference log-probs on the short context
    ref_chosen = sequence_logprobs(answer_hidden(reference, short_context, chosen),
                                   reference.lm_head.weight, chosen)
    ref_rejected = sequence_logprobs(answer_hidden(reference, short_context, rejected),
                                     reference.lm_head.weight, rejected)
loss, chosen_rewards, rejected_rewards = loss_fn(
    policy.lm_head.weight,
    answer_hidden(policy, long_context, chosen), answer_hidden(policy, long_context, rejected),
    chosen, rejected, ref_chosen, ref_rejected)
loss.backward()
optimizer.step()
optimizer.zero_grad()
print(f"loss {loss.item():.4f}  reward margin {(chosen_rewards - rejected_rewards).mean().item():+.5f}")
'''


def _run_example(source, name, device):
    namespace = {}
    with torch.device(device):  # the examples' factory calls and modules land on the test device
        exec(compile(source, f"README:{name}", "exec"), namespace)
    return namespace


def test_replacing_a_trainer_loss(backend, device):
    _run_example(REPLACING_A_TRAINER_LOSS, "replacing-a-trainer-loss", device)


def test_longpo_training_step(backend, device):
    namespace = _run_example(LONGPO_STEP, "longpo-step", device)
    policy = namespace["policy"]
    assert torch.isfinite(namespace["loss"])
    # The step reached every parameter through the fused loss (the head included).
    reference = namespace["reference"]
    moved = [not torch.equal(p, r) for p, r in zip(policy.parameters(), reference.parameters())]
    assert all(moved)
