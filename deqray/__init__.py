"""deqray: train and tune Deep Equilibrium Models at scale.

`deqray.core` is the equilibrium core in pure PyTorch; importing `deqray`
does not import Ray.
"""

__version__ = "0.1.0"
