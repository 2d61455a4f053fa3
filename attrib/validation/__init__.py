"""Ground-truth validation of region attribution on the synthetic world: scoring, baselines, result, pipeline."""
from attrib.validation.pipeline import region_results, select_records, validate, write_validation
from attrib.validation.result import ValidationResult
from attrib.validation.scoring import best_band, cells_in_box, pointing_and_mass, score_maps

__all__ = ["ValidationResult", "best_band", "cells_in_box", "pointing_and_mass", "region_results", "score_maps",
           "select_records", "validate", "write_validation"]
