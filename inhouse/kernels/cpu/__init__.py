"""The cpu backend's native kernels: plain C with run-time SIMD dispatch (csrc/, built by setup.py
into one library, `inhouse.kernels.cpu._native`), loaded through ctypes (native.py), each with a
thin wrapper beside the PyTorch reference it is tested against."""
