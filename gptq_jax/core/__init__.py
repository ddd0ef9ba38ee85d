"""Pure JAX GPTQ: grid fitting, Hessians, the solver and packing. No Flax modules, no I/O."""
