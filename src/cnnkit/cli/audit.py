"""cnnkit audit: duplicates, leakage, class balance, sizes and unreadable files of a dataset."""
from __future__ import annotations

from ..errors import CnnkitError
from .common import print_json


def add(sub) -> None:
    p = sub.add_parser("audit",
                        help="duplicates within and across splits, leakage, class balance, sizes, unreadable files",
                        description="Exact duplicates (same pixels) and near duplicates (resized, re-encoded or "
                                    "slightly cropped copies: cosine similarity of 32x32 grey thumbnails at or above "
                                    "--threshold), leakage per pair of splits, class balance, file sizes and modes, "
                                    "unreadable files. Writes audit.json, duplicates.csv, duplicates.png, audit.html.")
    p.add_argument("data", help="mnist, fashion-mnist, cifar10, digits, a folder, or a label file (.csv, .tsv, .jsonl)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--image-size", type=int, default=None, help="decode folders at this size (default 64)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None)
    p.add_argument("--threshold", type=float, default=None, help="near-duplicate similarity (default 0.995)")
    p.add_argument("--out", default=None, help="output folder (default: audit-<data>)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.audit import audit_to_folder

    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise CnnkitError("--threshold is a cosine similarity in (0, 1]")
    result, files = audit_to_folder(args.data, out=args.out, data_dir=args.data_dir, image_size=args.image_size,
                                    channels=args.channels, threshold=args.threshold)
    if args.json:
        print_json(result, files)
        return 0
    print(f"{result['data']}: {result['images']:,} images, {result['exact_pairs']:,} exact and "
          f"{result['near_pairs']:,} near duplicate pairs ({result['label_conflicts']:,} with different labels), "
          f"{len(result['unreadable'])} unreadable file(s)")
    for name, leak in result["leakage"].items():
        print(f"  {name}: {leak['images']:,} images ({leak['share']:.2%}) have a copy")
    print(f"report: {files['report']}")
    return 0
