"""Few-shot tasks: which `k` labelled cases adapt a model (support) and which evaluate it (query).

A task is fixed by (dataset, structures, k, seed): cases where any requested structure is not
annotated or empty are skipped, the eligible ones are shuffled with
``np.random.default_rng(seed)``, the first `k` are the support set and the rest (up to
`n_query`) the queries. With a partition (the FSEFT reference repository's
``<structure>_train.txt`` / ``<structure>_test.txt`` files) support comes from the train list
and queries from the test list.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fseft.data.datasets import Case, Dataset
from fseft.data.inspection import voxel_counts
from fseft.data.structures import canonical_name, canonical_names
from fseft.errors import ConfigError, InputFileError
from fseft.utils import write_text

# Image file endings stripped when a partition line names a file rather than a case id.
_IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def eligible_cases(
    dataset: Dataset,
    structures: Sequence[str] | str,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> list[str]:
    """Ids (sorted) of the labelled cases where every structure is annotated and non-empty."""
    names = _structures(dataset, structures)
    counts = voxel_counts(dataset, names, cache_dir=cache_dir, progress=progress)
    return sorted(cid for cid, c in counts.items() if all(c.get(s, 0) > 0 for s in names))


def _structures(dataset: Dataset, structures: Sequence[str] | str) -> tuple[str, ...]:
    names = canonical_names(structures)
    if not names:
        raise ConfigError("a few-shot task needs at least one structure")
    absent = [s for s in names if s not in dataset.structures]
    if absent:
        raise ConfigError(
            f"dataset {dataset.name!r} ({dataset.root}) does not annotate {', '.join(absent)}; "
            f"it annotates: {', '.join(dataset.structures) or 'nothing'}"
        )
    return names


def _check_ids(dataset: Dataset, ids: Iterable[str], what: str) -> None:
    known = {c.case_id for c in dataset.cases}
    unknown = [i for i in ids if i not in known]
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ConfigError(
            f"{what}: {len(unknown)} case id(s) not in dataset {dataset.name!r} ({dataset.root}): "
            f"{', '.join(unknown[:5])}{more}"
        )


@dataclass(frozen=True)
class FewShotTask:
    """A few-shot task: `support` (the `k` adaptation cases) and `query` (evaluation cases),
    disjoint case ids of dataset `dataset` (its name), for canonical `structures`."""

    dataset: str
    structures: tuple[str, ...]
    k: int
    seed: int
    support: tuple[str, ...]
    query: tuple[str, ...]

    def __post_init__(self) -> None:
        # Accept lists (JSON) but store tuples: the task stays hashable and immutable.
        for name in ("structures", "support", "query"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.support) != self.k:
            raise ConfigError(f"few-shot task: k={self.k} but {len(self.support)} support cases")
        overlap = sorted(set(self.support) & set(self.query))
        if overlap:
            raise ConfigError(f"few-shot task: cases both in support and query: {', '.join(overlap)}")

    @classmethod
    def sample(
        cls,
        dataset: Dataset,
        structures: Sequence[str] | str,
        k: int,
        seed: int,
        n_query: int | None = None,
        *,
        partition: tuple[Sequence[str], Sequence[str]] | None = None,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> FewShotTask:
        """Draw `k` support cases and up to `n_query` query cases (default: all the others).

        Only cases where every requested structure is annotated and non-empty are eligible
        (voxel counts, cached, see `fseft.data.inspection.voxel_counts`). The same arguments give
        the same task. With ``partition=(train_ids, test_ids)`` support is drawn from the
        train ids and queries from the test ids. Raises `ConfigError` when `k` exceeds the
        eligible cases or no query case is left.
        """
        names = _structures(dataset, structures)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"few-shot task: k must be an integer >= 1, got {k!r}")
        if n_query is not None and (isinstance(n_query, bool) or not isinstance(n_query, (int, np.integer)) or n_query < 1):
            raise ConfigError(f"few-shot task: n_query must be an integer >= 1 or None, got {n_query!r}")
        eligible = eligible_cases(dataset, names, cache_dir=cache_dir, progress=progress)
        labelled = len(dataset.labelled_cases)
        what = f"{', '.join(names)} in dataset {dataset.name!r}"
        rng = np.random.default_rng(seed)

        if partition is None:
            if k > len(eligible):
                raise ConfigError(
                    f"k={k} support cases requested, but only {len(eligible)} of the {labelled} "
                    f"labelled cases have {what} non-empty"
                )
            order = [eligible[i] for i in rng.permutation(len(eligible))]
            support, rest = order[:k], order[k:]
        else:
            train, test = (list(dict.fromkeys(p)) for p in partition)
            both = sorted(set(train) & set(test))
            if both:
                raise ConfigError(f"partition: cases both in train and test: {', '.join(both[:5])}")
            _check_ids(dataset, train, "partition train list")
            _check_ids(dataset, test, "partition test list")
            eligible_set = set(eligible)
            train_pool = sorted(set(train) & eligible_set)
            test_pool = sorted(set(test) & eligible_set)
            if k > len(train_pool):
                raise ConfigError(
                    f"k={k} support cases requested, but only {len(train_pool)} of the "
                    f"{len(train)} partition train cases have {what} non-empty"
                )
            support = [train_pool[i] for i in rng.permutation(len(train_pool))[:k]]
            rest = [test_pool[i] for i in rng.permutation(len(test_pool))]
        query = rest if n_query is None else rest[:n_query]
        if not query:
            raise ConfigError(
                f"k={k} leaves no query case: {len(eligible)} of the {labelled} labelled cases "
                f"have {what} non-empty" + ("" if partition is None else " (none in the partition's test list)")
            )
        return cls(dataset.name, names, int(k), int(seed), tuple(sorted(support)), tuple(sorted(query)))

    def support_cases(self, dataset: Dataset) -> list[Case]:
        """The support `Case`s, looked up in `dataset`."""
        return [dataset.case(c) for c in self.support]

    def query_cases(self, dataset: Dataset) -> list[Case]:
        """The query `Case`s, looked up in `dataset`."""
        return [dataset.case(c) for c in self.query]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "structures": list(self.structures),
            "k": self.k,
            "seed": self.seed,
            "support": list(self.support),
            "query": list(self.query),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FewShotTask:
        fields = ("dataset", "structures", "k", "seed", "support", "query")
        if not isinstance(data, Mapping):
            raise ConfigError(f"few-shot task: expected a mapping with {', '.join(fields)}")
        missing = [f for f in fields if f not in data]
        extra = sorted(set(data) - set(fields))
        if missing or extra:
            raise ConfigError(
                "few-shot task: "
                + (f"missing {', '.join(missing)}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unknown {', '.join(extra)}" if extra else "")
            )
        return cls(
            str(data["dataset"]),
            canonical_names(list(data["structures"])),
            int(data["k"]),
            int(data["seed"]),
            tuple(str(c) for c in data["support"]),
            tuple(str(c) for c in data["query"]),
        )


# ---------------------------------------------------------------------------- partition files


def _partition_stem(structure: str | None) -> str:
    """File-name prefix: the canonical name; "" (files ``_train.txt``) for all structures."""
    return canonical_name(structure) if structure else ""


def case_id_from_entry(entry: str) -> str:
    """Case id of a partition-file entry: a plain id, or an image path as in the FSEFT
    reference files (``data/s0004/ct.nii.gz`` -> ``s0004``,
    ``.../FLARE22_Tr_0001_0000.nii.gz`` -> ``FLARE22_Tr_0001``)."""
    name = entry.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if "/" not in entry and not name.lower().endswith(_IMAGE_ENDINGS):
        return entry
    stem = next((name[: -len(e)] for e in _IMAGE_ENDINGS if name.lower().endswith(e)), name)
    if stem == "ct":  # TotalSegmentator: <case>/ct.nii.gz
        parts = entry.replace("\\", "/").split("/")
        return parts[-2] if len(parts) > 1 else stem
    return stem[: -len("_0000")] if stem.endswith("_0000") else stem


def _read_ids(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: cannot read partition file ({exc})") from exc
    ids: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            # Reference files hold "<image path>   <label path>" per line: the image names the case.
            ids.append(case_id_from_entry(line.split()[0]))
    return list(dict.fromkeys(ids))


def read_partition(directory: str | os.PathLike, structure: str | None) -> tuple[list[str], list[str]]:
    """Read ``<structure>_train.txt`` and ``<structure>_test.txt`` from `directory`:
    ``(train_ids, test_ids)`` in file order. `structure` in any spelling (the canonical file
    name is tried first, then the spelling given); None or "" reads ``_train.txt`` /
    ``_test.txt`` (one partition for all structures). Lines are case ids or image paths."""
    directory = Path(directory).expanduser()
    stems = list(dict.fromkeys([_partition_stem(structure), (structure or "").strip()]))
    for stem in stems:
        train, test = directory / f"{stem}_train.txt", directory / f"{stem}_test.txt"
        if train.is_file() or test.is_file():
            for path in (train, test):
                if not path.is_file():
                    raise InputFileError(f"{path}: partition file missing (its pair {train if path is test else test} exists)")
            return _read_ids(train), _read_ids(test)
    tried = ", ".join(f"{s}_train.txt" for s in stems)
    raise InputFileError(f"{directory}: no partition files for {structure or 'all structures'!r} (looked for {tried})")


def write_partition(
    directory: str | os.PathLike, structure: str | None, train: Sequence[str], test: Sequence[str]
) -> tuple[Path, Path]:
    """Write ``<structure>_train.txt`` / ``<structure>_test.txt`` (canonical name, one case id
    per line, each file atomically). Returns the two paths."""
    train, test = [str(c) for c in train], [str(c) for c in test]
    both = sorted(set(train) & set(test))
    if both:
        raise ConfigError(f"partition for {structure!r}: cases both in train and test: {', '.join(both[:5])}")
    directory = Path(directory).expanduser()
    stem = _partition_stem(structure)
    paths = (directory / f"{stem}_train.txt", directory / f"{stem}_test.txt")
    for path, ids in zip(paths, (train, test)):
        write_text(path, "".join(f"{i}\n" for i in ids))
    return paths
