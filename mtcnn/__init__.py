"""MTCNN face detection: P-Net, R-Net and O-Net with five landmarks."""

from .detector import DetectorConfig, Detections, FaceDetector
from .nets import ONet, PNet, RNet
from .weights import CascadeWeights, WeightsError, load_weights, save_weights

__all__ = [
    "CascadeWeights", "DetectorConfig", "Detections", "FaceDetector", "ONet", "PNet", "RNet",
    "WeightsError", "load_weights", "save_weights",
]
__version__ = "0.1.0"
