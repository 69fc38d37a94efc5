"""Other continual-learning methods' arithmetic as pure functions.

`inflora` (Liang & Li, CVPR 2024) and `simplecil` (Zhou et al., 2023), each
an array-in, array-out core with no runner import (docs/methods.md).
"""
