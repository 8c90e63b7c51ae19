"""The layout rules of a training batch: whole chunks per device, whole classes per process.

Serves both tasks. Pure arithmetic on sizes, with no JAX import, so that validating a config
(`config_checks`) and the sharded step (`train.sharded_step`) apply the one rule without the config
loading JAX.
"""

from __future__ import annotations

from recall_jax import errors


def batch_layout_problems(global_batch_size: int, chunk_size_per_device: int, num_devices: int,
                          num_processes: int = 1,
                          samples_per_class: int | None = None) -> list[str]:
  """Every way a global batch does not fit the sharded step (the one home of this rule).

  The batch must split into chunks of `chunk_size_per_device` on every device, and (with
  `samples_per_class`) into whole classes: of m images, for the batch and for each process's slice.

  Args:
    global_batch_size: B, images per step over all devices.
    chunk_size_per_device: images one device embeds at once.
    num_devices: devices in the mesh.
    num_processes: processes feeding the batch (each gets B / num_processes rows).
    samples_per_class: m, if the batch (and each process's slice) must hold whole classes.

  Returns:
    One message per problem, each naming the sizes and a valid alternative; empty if none.
  """
  problems = []
  for name, value in (("global batch size", global_batch_size),
                      ("chunk_size_per_device", chunk_size_per_device),
                      ("number of devices", num_devices), ("number of processes", num_processes),
                      ("samples_per_class", 1 if samples_per_class is None else samples_per_class)):
    if int(value) != value or value < 1:
      problems.append(f"{name} must be a positive integer, got {value}")
  if problems:
    return problems
  if num_devices % num_processes:
    problems.append(f"{num_devices} devices do not split evenly over {num_processes} processes")
  if samples_per_class is not None and global_batch_size % samples_per_class:
    problems.append(f"global batch {global_batch_size} is not divisible by samples_per_class "
                    f"(m) {samples_per_class}")
  global_chunk = chunk_size_per_device * num_devices
  if global_batch_size % global_chunk:
    per_device = global_batch_size / num_devices
    hint = (f"per-device batch {global_batch_size // num_devices}; pick chunk_size_per_device "
            f"dividing it" if per_device == int(per_device) else
            f"use a global batch that is a multiple of {global_chunk}")
    problems.append(
        f"global batch {global_batch_size} is not divisible by chunk_size_per_device "
        f"{chunk_size_per_device} x {num_devices} devices = {global_chunk} ({hint})")
  if (samples_per_class is not None and num_processes > 1 and not num_devices % num_processes
      and (global_batch_size // num_processes) % samples_per_class):
    problems.append(
        f"each of {num_processes} processes gets {global_batch_size // num_processes} images, not "
        f"a multiple of samples_per_class {samples_per_class}")
  return problems


def check_batch_layout(global_batch_size: int, chunk_size_per_device: int, num_devices: int,
                       num_processes: int = 1, samples_per_class: int | None = None) -> int:
  """Validates a global batch for the sharded step; returns the number of chunks.

  Args:
    As `batch_layout_problems`.

  Returns:
    n = B / (chunk_size_per_device * num_devices), the number of chunks per step.

  Raises:
    ConfigError: naming every problem `batch_layout_problems` finds.
  """
  problems = batch_layout_problems(global_batch_size, chunk_size_per_device, num_devices,
                                   num_processes, samples_per_class)
  if problems:
    raise errors.ConfigError("; ".join(problems))
  return global_batch_size // (chunk_size_per_device * num_devices)


def memory_max_positives(samples_per_class: int, batch_size: int, memory_size: int) -> int:
  """The most database rows of a query's class, less its own, with a cross-batch memory.

  A batch holds at most m images of any class (the m-per-class sampler draws B / m distinct
  classes of m images each), and every step writes one whole batch into the memory, so its last
  M rows come from at most ceil(M / B) batches: a query meets at most m - 1 positives in its own
  batch and m of them from each stored batch. This bounds the losses' static positive slots far
  below the m + M - 1 that a memory of any content would need (19 instead of 16,003 at B = 4,000,
  m = 4 and M = 16,000), which is what makes a large memory affordable.

  Args:
    samples_per_class: m, images per class in a batch.
    batch_size: B, images per step (the global batch: each step writes all of it).
    memory_size: M, rows of the memory.

  Returns:
    (m - 1) + m * ceil(M / B).
  """
  for name, value in (("samples_per_class", samples_per_class), ("batch_size", batch_size),
                      ("memory_size", memory_size)):
    if int(value) != value or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value}")
  return samples_per_class - 1 + samples_per_class * -(-memory_size // batch_size)
