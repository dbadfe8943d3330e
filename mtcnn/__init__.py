"""MTCNN face detection: P-Net, R-Net and O-Net with five landmarks."""

from .detector import DetectorConfig, Detections, FaceDetector
from .memory import downscaled_min_face, estimate_peak_bytes, in_original, scale_to_fit, scaled_size, shrunk
from .nets import ONet, PNet, RNet
from .weights import CascadeWeights, WeightsError, load_weights, save_weights

__all__ = [
    "CascadeWeights", "DetectorConfig", "Detections", "FaceDetector", "ONet", "PNet", "RNet",
    "WeightsError", "downscaled_min_face", "estimate_peak_bytes", "load_weights", "save_weights",
    "in_original", "scale_to_fit", "scaled_size", "shrunk",
]
__version__ = "0.1.0"
