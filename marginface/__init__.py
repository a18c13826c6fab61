"""marginface: margin-based softmax face recognition, from training to the phone."""
__version__ = "0.1.0"
