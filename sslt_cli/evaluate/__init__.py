"""Evaluation: score localisation maps under a published protocol, beside honest baselines, with N accounted for.

The package, in the order ``sslt eval`` uses it:

* :mod:`~sslt_cli.evaluate.options`: protocol presets by name and their deviation options;
* :mod:`~sslt_cli.evaluate.sets`: a test set (:func:`load_test_set`, :func:`load_vggss_json_set`), every listed clip
  whose annotation, frame or audio cannot be used reported; SLAVC's non-sounding pairs;
* :mod:`~sslt_cli.evaluate.maps`: maps of a model over a set's clips (:func:`predict_maps`) or precomputed ones
  (:func:`load_maps`: a folder of ``<clip id>.npy`` or one ``.npz`` keyed by clip id, any map size);
* :mod:`~sslt_cli.evaluate.scoring`: :func:`score_maps` (per-clip IoU, pointing game, predicted area, cIoU / AUC /
  mean IoU and the baselines on the same clips: centre prior, uniform random maps, whole frame, the oracle ceiling)
  and :func:`score_extended` (SLAVC's AP and max-F1 with non-sounding pairs);
* :mod:`~sslt_cli.evaluate.negatives`: negative audio (silence, noise, off-screen sound) on each frame beside its
  positive map, from one pass over the images (:func:`predict_with_negatives`), scored by SLAVC's and vssl_eval's
  rules (:func:`score_negatives`), the per-model threshold chosen on a validation set (:func:`per_model_threshold`);
* :mod:`~sslt_cli.evaluate.outputs`: ``metrics.json``, ``per_clip.csv``, ``excluded.csv``, ``defects.csv``,
  ``gallery.png`` (:func:`write_outputs`), MLflow names (:func:`mlflow_metrics`), the table (:func:`result_table`);
* :mod:`~sslt_cli.evaluate.orchestrate`: models x test sets -> results, the one path every caller takes.
"""
from sslt_cli.evaluate.maps import (embed_audio, embed_images, eval_loader, load_maps, maps_from_batches,
                                    numpy_file_problem, predict_maps, save_maps)
from sslt_cli.evaluate.negatives import (NegativeMaps, NegativesResult, negative_key, parse_negative_maps,
                                         per_model_threshold, predict_with_negatives, score_negatives)
from sslt_cli.evaluate.options import PROTOCOL_OPTIONS, EvalOptions, ExtendedPairs, NegativeOptions, get_protocol
from sslt_cli.evaluate.orchestrate import (SUMMARY_KEYS, Evaluation, SetEvaluation, Source, evaluate_model,
                                           log_evaluation, print_evaluation, run_evaluation, saved_summaries,
                                           score_precomputed)
from sslt_cli.evaluate.outputs import (MLFLOW_NAME, eval_folder, mlflow_metrics, negatives_metrics, negatives_table,
                                      result_dict, result_table, write_outputs)
from sslt_cli.evaluate.scoring import (BASELINE_LABELS, CHUNK, RANDOM_SEEDS, STAGES, ClipScore, EvalResult, Exclusion,
                                       ExtendedResult, score_extended, score_extended_maps, score_interactive, score_maps,
                                       test_summary)
from sslt_cli.evaluate.sets import TestSet, load_test_set, load_vggss_json_set, read_silent_pairs, silent_pair_key

__all__ = ["BASELINE_LABELS", "CHUNK", "MLFLOW_NAME", "PROTOCOL_OPTIONS", "RANDOM_SEEDS", "STAGES", "SUMMARY_KEYS",
           "ClipScore", "EvalOptions", "EvalResult", "Evaluation", "Exclusion", "ExtendedPairs", "ExtendedResult",
           "NegativeMaps", "NegativeOptions", "NegativesResult", "SetEvaluation", "Source", "TestSet", "embed_audio", "embed_images", "eval_folder", "eval_loader",
           "evaluate_model", "get_protocol", "load_maps", "load_test_set", "load_vggss_json_set", "log_evaluation",
           "maps_from_batches", "mlflow_metrics", "negative_key", "negatives_metrics", "negatives_table",
           "numpy_file_problem", "parse_negative_maps", "per_model_threshold", "predict_with_negatives", "predict_maps", "print_evaluation",
           "read_silent_pairs", "result_dict", "result_table", "run_evaluation", "save_maps", "saved_summaries",
           "score_extended", "score_extended_maps", "score_interactive", "score_maps", "score_negatives", "score_precomputed", "silent_pair_key",
           "test_summary", "write_outputs"]
