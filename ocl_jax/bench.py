"""`python -m ocl_jax.bench`: an alias of `python -m ocl_jax.tools.bench`, the benchmark."""

if __name__ == "__main__":
  import runpy

  runpy.run_module("ocl_jax.tools.bench", run_name="__main__", alter_sys=True)
