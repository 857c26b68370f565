"""Balance: the conditional GAN that adds synthetic tiles to under-represented classes (``gan``)."""
