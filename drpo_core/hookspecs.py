"""drpo's plugin hooks. Each hook receives a ``register`` callback, so one plugin can add several
components::

    from drpo_core import hookimpl

    @hookimpl
    def drpo_register_kernels(register):
        register("imq", build_imq, summary="inverse multiquadric")

``register(name, factory, *, options=None, defaults=None, variants=None, aliases=(), summary="")``:

* ``factory(options, context)`` builds the component; ``options`` is an instance of the
  ``options`` pydantic model (or ``{}`` when there is none), ``context`` a
  :class:`drpo_core.registry.BuildContext` (variant, device, dtype, seed). Import heavy libraries
  inside the factory, never at module level, so ``drpo --help`` stays fast.
* ``options``: a pydantic model class (``extra="forbid"``) declaring the component's own keys.
* ``defaults``: recommended run settings as ``{"dotted.key": value}`` (or a function of the
  variant returning one), merged under the user's config and shown with their origin.
* ``variants``: the allowed ``name:variant`` suffixes (``None``: no variant).
"""

import pluggy

hookspec = pluggy.HookspecMarker("drpo")
hookimpl = pluggy.HookimplMarker("drpo")


@hookspec
def drpo_register_generators(register):
    """Register one-step generators."""


@hookspec
def drpo_register_rankers(register):
    """Register rankers (rewards used only for their order)."""


@hookspec
def drpo_register_features(register):
    """Register frozen feature spaces."""


@hookspec
def drpo_register_kernels(register):
    """Register drift kernels."""


@hookspec
def drpo_register_commands(cli):
    """Add Typer commands or sub-apps to the ``drpo`` command line."""
