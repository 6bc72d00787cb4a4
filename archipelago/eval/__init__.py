"""Offline evaluation of samples: Fréchet distance in the features of a small classifier trained on the
data's train split, class-consistency, and FID/KID only when Inception weights are already local."""
from archipelago.eval.classifier import (
    DigitClassifier,
    load_or_train_classifier,
    split_data,
    train_classifier,
)
from archipelago.eval.metrics import (
    class_consistency,
    evaluate_samples,
    extract_features,
    feature_distance,
    fid_kid,
    frechet_distance,
    inception_weights,
)

__all__ = ["DigitClassifier", "class_consistency", "evaluate_samples", "extract_features", "feature_distance",
           "fid_kid", "frechet_distance", "inception_weights", "load_or_train_classifier", "split_data",
           "train_classifier"]
