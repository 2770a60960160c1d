"""Methods that sample from the policy during training: SoPo, Diffusion-DRO, online judges and pair builders."""
