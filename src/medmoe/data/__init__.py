"""Medical QA data: one record type, one loader per format, fixed splits, validation."""

from medmoe.data.datasets import CMMLU_MEDICAL, DATASETS, dataset_info, load_dataset, load_splits
from medmoe.data.generic import load_file, parse_mapping
from medmoe.data.record import Record

__all__ = ["CMMLU_MEDICAL", "DATASETS", "Record", "dataset_info", "load_dataset", "load_file", "load_splits", "parse_mapping"]
