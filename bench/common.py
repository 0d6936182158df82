"""What the model benchmarks share: the input-shape flags and the torch set-up they imply."""

from __future__ import annotations

import argparse

import torch

from geca.utils.allocator import keep_freed_memory


def model_parser(doc: str | None, batch: int, batch_help: str) -> argparse.ArgumentParser:
    """Flags for named configs at an input shape on a device; scripts add their own after these."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="GeCA-T,DiT-T,LDM-T", help="Comma-separated named configs (any family).")
    ap.add_argument("--batch", type=int, default=batch, help=batch_help)
    ap.add_argument("--resolution", type=int, default=32, help="Grid size (32 = SD-VAE latent of 256² images).")
    ap.add_argument("--channels", type=int, default=4, help="Input channels (4 = SD-VAE latents).")
    ap.add_argument("--classes", type=int, default=11, help="Label entries.")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N].")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="tuned: glibc keeps freed memory, as the geca command does; default: glibc as it comes.")
    ap.add_argument("--json", action="store_true", help="Print JSON only.")
    return ap


def device_of(args: argparse.Namespace) -> torch.device:
    if args.malloc == "tuned":
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    return torch.device(args.device)
