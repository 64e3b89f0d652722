"""``hybridattn.memory.plan(config, context, batch, dtype)``: the memory planner (see
:mod:`hybridattn.models.memory`)."""

from hybridattn.models.memory import KindMemory, MemoryPlan, format_bytes, plan, print_plan  # noqa: F401
