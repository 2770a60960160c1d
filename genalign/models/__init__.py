"""Networks this package defines itself: the motion denoiser, caption encoders, text-motion evaluators, tiny test models."""
