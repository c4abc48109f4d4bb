"""What the tests share and is not a test: small models, quantized bases, oracles, fixtures, the torchrun
launcher and the workers it runs by path."""
