"""Data: the one RetrievalDataModule, video decoding and sampling, the dataset registry, synthetic clips."""

from petl_bench.data.datasets import DatasetSpec, dataset_names, get_dataset, register_dataset


def load_annotations(dataset: str, split: str, root, **options):
    """Return `[(video_id, [captions]), ...]` in split order for one split of a registered dataset.

    ActivityNet and DiDeMo give one paragraph per video. `root` is the folder holding the annotation files.
    """
    from pathlib import Path

    spec = get_dataset(dataset)
    if split not in spec.splits:
        raise ValueError(f"dataset {dataset!r} has no split {split!r}; its splits are {', '.join(spec.splits)}")
    return spec.load(split, Path(root), **options)


__all__ = ["DatasetSpec", "dataset_names", "get_dataset", "load_annotations", "register_dataset"]
