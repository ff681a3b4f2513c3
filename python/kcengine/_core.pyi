"""Types of the private native module (C++17 + OpenMP; see csrc/cpu). Use the public API instead."""
from typing import Optional, Sequence

import numpy as np
import numpy.typing as npt

def max_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def cpu_features() -> dict[str, bool]: ...
def kmeans_isa() -> str: ...

_KMeansOut = tuple[list[np.ndarray], list[npt.NDArray[np.int64]], npt.NDArray[np.float64], npt.NDArray[np.int32],
                   npt.NDArray[np.bool_], list[str]]

def kmeans_batch_f32(datasets: Sequence[npt.NDArray[np.float32]], weights: Optional[Sequence[npt.NDArray[np.float64]]],
                     data_index: npt.NDArray[np.int64], k: npt.NDArray[np.int64], init: str,
                     init_centers: Optional[Sequence[npt.NDArray[np.float32]]], n_init: int, max_iter: int,
                     tol: float, seed: int, algorithm: str) -> _KMeansOut: ...
def kmeans_batch_f64(datasets: Sequence[npt.NDArray[np.float64]], weights: Optional[Sequence[npt.NDArray[np.float64]]],
                     data_index: npt.NDArray[np.int64], k: npt.NDArray[np.int64], init: str,
                     init_centers: Optional[Sequence[npt.NDArray[np.float64]]], n_init: int, max_iter: int,
                     tol: float, seed: int, algorithm: str) -> _KMeansOut: ...

def conv_gather_epilogue(u: np.ndarray, index: np.ndarray, scale: Optional[np.ndarray], shift: Optional[np.ndarray],
                         residual: Optional[np.ndarray], relu: bool, out: np.ndarray, threads: int = 0) -> None: ...
def conv_gather_sum(p: np.ndarray, pair: np.ndarray, scale: Optional[np.ndarray], shift: Optional[np.ndarray],
                    residual: Optional[np.ndarray], relu: bool, out: np.ndarray, threads: int = 0) -> None: ...
class ConvDirectPack:
    """The codebook side of conv_kernel_direct in its native layout (from conv_kernel_pack)."""
    @property
    def shape(self) -> tuple[int, int, int, int]: ...  # (C_in, kh*kw, M, C_out)
    @property
    def slot_bits(self) -> int: ...
    @property
    def pixel_lanes(self) -> bool: ...

def conv_kernel_pack(wt: np.ndarray, slot: npt.NDArray[np.int32]) -> ConvDirectPack: ...
def conv_kernel_direct(x: np.ndarray, pack: ConvDirectPack, geom: Sequence[int], scale: Optional[np.ndarray],
                       shift: Optional[np.ndarray], residual: Optional[np.ndarray], relu: bool, out: np.ndarray,
                       threads: int = 0) -> None: ...
