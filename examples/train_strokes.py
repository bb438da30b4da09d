"""Train a small caption-to-strokes transformer on a run's output, then paint a sample from it.

    python run_encode.py --demo                                     # writes demo_out/strokes
    python examples/train_strokes.py demo_out/strokes --steps 300   # minutes on a CPU; a GPU runs it as is
    python examples/train_strokes.py OUT --steps 20000 --strokes 1000 --batch 32 --layers 8 --dim 512

The data comes through the streaming loader (``pipeline.stream.StrokeStream``: row groups shuffled
per epoch, split over DataLoader workers and, under torchrun, over ranks) and the stroke tokenizer
(``pipeline.tokenizer.StrokeTokenizer``). A training sequence is the caption's UTF-8 bytes, a
separator, then the painting's tokens: ``BOS r g b GROUP stroke... EOS``. Only the painting's tokens
are learned. Every prefix of a painting is a painting, so ``--strokes K`` trains on the first K
strokes (the coarse ones, placed first by the fit), which keeps sequences short on a CPU.

Sampling follows the token grammar: each position may only take the tokens of the field due there
(the tokenizer gives each field its own id range), so every sample decodes to valid strokes. The
sample is rendered with ``encoder.render`` and saved as a PNG beside the training photo's painting.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import encoder  # noqa: E402
from pipeline.columns import file_metadata, open_file, parquet_files  # noqa: E402
from pipeline.stream import StrokeStream, collate_strokes  # noqa: E402
from pipeline.tokenizer import BOS, GROUP, PAD, WIDTH, StrokeTokenizer  # noqa: E402

CAPTION_BYTES = 96


class Vocabulary:
    """Stroke tokens first (the tokenizer's ids), then 256 caption bytes and a separator."""

    def __init__(self, tokenizer: StrokeTokenizer):
        self.tokenizer = tokenizer
        self.byte0 = tokenizer.vocab_size
        self.sep = self.byte0 + 256
        self.size = self.sep + 1

    def caption(self, text: str | None) -> list[int]:
        return [self.byte0 + b for b in (text or "").encode("utf-8")[:CAPTION_BYTES]] + [self.sep]

    def batch(self, batch: dict, strokes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated batch -> (tokens [B, L], loss mask [B, L]: True where the next token is learned)."""
        lengths = batch["lengths"].clamp(max=strokes)
        tokens, ends = self.tokenizer.encode(batch["strokes"][:, :strokes], batch["background"], lengths)
        rows = []
        for caption, painting, end in zip(batch["caption"], tokens, ends):
            prefix = self.caption(caption)
            rows.append((torch.tensor(prefix + painting[:end].tolist()), len(prefix)))
        width = max(len(r) for r, _ in rows)
        out = torch.full((len(rows), width), PAD, dtype=torch.long)
        learn = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (row, start) in enumerate(rows):
            out[i, : len(row)] = row
            learn[i, start : len(row)] = True  # the painting's tokens, BOS to EOS
        return out, learn


class Block(nn.Module):
    """Pre-norm attention and MLP; ``cache`` (a list, filled on first use) keeps keys and values so
    sampling costs one position per token instead of the whole prefix."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        # Causal over the new positions; a single new position sees the whole cache.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] == k.shape[2] and t > 1)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class StrokeLM(nn.Module):
    """A small decoder-only transformer (learned positions, tied embeddings)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.max_len = max_len
        # Small embeddings: they are also the output layer (tied), and N(0, 1) would start the
        # logits at a scale of sqrt(dim), far from a uniform guess.
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, caches: list | None = None, start: int = 0) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(torch.arange(start, start + tokens.shape[1], device=tokens.device))
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.norm(x) @ self.embed.weight.T


def allowed(tokenizer: StrokeTokenizer, position: int) -> tuple[int, int]:
    """Token ids [start, stop) due at ``position`` of a painting (0 = BOS), by the tokenizer's grammar."""
    if position == 0:
        return BOS, BOS + 1
    if position <= 3:  # the background's r, g, b
        return tokenizer.field_range(("r", "g", "b")[position - 1])
    offset = (position - 4) % (tokenizer.group_size * WIDTH + 1)
    if offset == 0:
        return GROUP, GROUP + 1
    return tokenizer.field_range((offset - 1) % WIDTH)


@torch.no_grad()
def sample(model: StrokeLM, vocab: Vocabulary, caption: str, strokes: int, device, temperature: float = 0.8,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Paint ``strokes`` strokes for a caption, one token at a time, each drawn from its field's range."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tokens = vocab.caption(caption)
    start = len(tokens)
    total = int(vocab.tokenizer.sequence_length(strokes)) - 1  # everything but EOS
    caches = [[] for _ in model.blocks]
    fed = 0  # tokens already in the caches
    for position in range(total):
        lo, hi = allowed(vocab.tokenizer, position)
        if hi - lo == 1:
            tokens.append(lo)
            continue
        logits = model(torch.tensor(tokens[fed:], device=device)[None], caches, fed)[0, -1, lo:hi]
        fed = len(tokens)
        tokens.append(lo + int(torch.multinomial((logits.float().cpu() / temperature).softmax(-1), 1,
                                                 generator=generator)))  # fmt: skip
    (painted, background), = vocab.tokenizer.decode(torch.tensor(tokens[start:])[None])
    return painted, background


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="output folder of run_encode.py (or a glob / file)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--strokes", type=int, default=40, help="train on (and paint) the first K strokes of each painting")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bins", type=int, default=None, help="bins for every field (default: the tokenizer's per-field bins)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: read in the training process)")
    ap.add_argument("--min-psnr", type=float)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--caption", help="caption to paint (default: the first training caption)")
    ap.add_argument("--size", type=int, default=256, help="sample painting size in pixels")
    ap.add_argument("-o", "--output", type=Path, default=Path("sample_painting.png"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = encoder.resolve_device(args.device)
    files = parquet_files(args.source)
    config = json.loads(file_metadata(open_file(files[0])).get("encoder_config", "{}"))
    # GROUP marks fall on the fit's own group boundaries (its coarse-to-fine stages).
    tokenizer = StrokeTokenizer(bins=args.bins, group_size=config.get("group_size", 100))
    vocab = Vocabulary(tokenizer)
    max_len = CAPTION_BYTES + 1 + int(tokenizer.sequence_length(args.strokes))
    model = StrokeLM(vocab.size, args.dim, args.layers, args.heads, max_len).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    stream = StrokeStream(args.source, columns=["key", "caption", "strokes", "background"], min_psnr=args.min_psnr,
                          buffer_size=256, seed=args.seed)  # fmt: skip
    loader = DataLoader(stream, batch_size=args.batch, num_workers=args.workers, collate_fn=collate_strokes)
    print(f"{len(stream)} paintings in {len(files)} files; vocabulary {vocab.size}, sequences up to {max_len} tokens; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters on {device}", flush=True)  # fmt: skip

    step, epoch, started, first_caption = 0, 0, time.time(), None
    while step < args.steps:
        stream.set_epoch(epoch)
        for batch in loader:
            first_caption = first_caption or next((c for c in batch["caption"] if c), None)
            tokens, learn = vocab.batch(batch, args.strokes)
            tokens, learn = tokens.to(device), learn.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")
            loss = (loss * learn[:, 1:]).sum() / learn[:, 1:].sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % 25 == 0 or step == 1:
                # An epoch is one pass over every painting: on the demo's 8 that is a single batch,
                # so there it advances with every step.
                print(f"step {step:5d}  epoch {epoch} (of {len(stream)} paintings, batch {args.batch})  "
                      f"loss {loss.item():.3f}  {time.time() - started:.0f} s", flush=True)
            if step >= args.steps:
                break
        epoch += 1

    caption = args.caption or first_caption or ""
    model.eval()
    strokes, background = sample(model, vocab, caption, args.strokes, device, seed=args.seed)
    canvas = encoder.render(strokes[None], background[None], args.size, args.size)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    encoder.tensor_to_pil(canvas[0]).save(args.output)
    print(json.dumps({"sample": str(args.output), "caption": caption, "strokes": len(strokes), "steps": step,
                      "final_loss": round(loss.item(), 4), "seconds": round(time.time() - started, 1)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
