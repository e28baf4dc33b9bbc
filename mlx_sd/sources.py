"""Where the training images come from: a local dataset folder, or a Hugging Face Hub dataset repo.

`--dataset_name user/repo` fetches the repo with huggingface_hub (into its usual cache, so a second
run and HF_HUB_OFFLINE=1 read it from disk) as an imagefolder: image files with `metadata.jsonl`
(`file_name` plus the caption column; `--image_column` / `--caption_column` as in diffusers'
training scripts), `captions.json`, or caption files beside the images. Only those files are
downloaded. Parquet-only repos (images inside the parquet files) are refused with what to do.

`subset(samples, n, seed)`: --max_train_samples, a seeded choice kept in the dataset's order.
"""

from __future__ import annotations

import os

from pathlib import Path

import numpy as np

from .data import CAPTION_FILES, IMAGE_EXTENSIONS, SIDECAR_EXTENSIONS, DataError


def _patterns(caption_extension: str | None) -> list[str]:
    exts = [e for x in IMAGE_EXTENSIONS for e in (x, x.upper())]
    caps = [caption_extension if caption_extension.startswith(".") else "." + caption_extension] \
        if caption_extension else list(SIDECAR_EXTENSIONS)
    return [f"*{e}" for e in exts + caps] + [f"*{name}" for name in CAPTION_FILES]


def fetch_hub_dataset(name: str, revision: str | None = None, caption_extension: str | None = None) -> Path:
    """The local folder of Hub dataset `name` at `revision` (downloaded on first use, then cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if name.count("/") != 1 or any(not part for part in name.split("/")):
        raise DataError(f"--dataset_name {name!r}: expected a Hub dataset id such as user/shoe-photos")
    where = f"--dataset_name {name}" + (f" --dataset_revision {revision}" if revision else "")
    try:
        folder = Path(snapshot_download(name, repo_type="dataset", revision=revision,
                                        allow_patterns=_patterns(caption_extension)))
    except RepositoryNotFoundError:
        raise DataError(f"{where}: no such dataset on the Hub (or it is private: log in with "
                        "`huggingface-cli login`)") from None
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")
        raise DataError(f"{where}: not in the local Hugging Face cache and " + (
            "HF_HUB_OFFLINE is set: unset it to download the dataset once" if offline else
            f"the Hub cannot be reached ({str(e).splitlines()[0]}): connect once to download it")) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise DataError(f"{where}: download failed ({type(e).__name__}: {e})") from None
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file()):
        raise DataError(f"{where}: the repo has no image files. Only imagefolder datasets (images with "
                        "metadata.jsonl, captions.json or caption files) are read; a parquet dataset can be "
                        "saved as one with the datasets library, or downloaded and given as --train_data_dir")
    return folder


def subset(samples: list, n: int | None, seed: int) -> list:
    """`n` samples chosen by `seed` (all when n is None or larger), in their original order."""
    if n is None or n >= len(samples):
        return samples
    keep = np.sort(np.random.default_rng([seed, 0, 0, 0, 0, 7]).choice(len(samples), n, replace=False))
    return [samples[i] for i in keep]
