"""The scope algebra: which axes of an (N, C, *spatial) tensor one statistic is taken over.

Any input is viewed as the logical axes ``N, G, Cg, *spatial`` with ``C = G * Cg`` split into
``G`` contiguous groups. A scope is the non-empty set of reduced axes; when ``C`` is reduced,
``Cg`` is reduced and ``G`` is kept (one statistic per group), otherwise ``G = 1`` and the
whole channel axis is kept. The batch axis splits the same way when ``sample_groups = S > 1``
(Ghost / virtual-batch normalization): ``N`` becomes ``S, N/S`` with ``S`` kept and ``N/S``
reduced, so each of S contiguous groups of samples gets its own statistics. Everything else
(kernels, reference, running statistics) is derived from the :class:`Spec` built here.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}

ALIASES = ("batch", "layer", "instance", "group", "batch_group", "positional")

# Groups default to 32 where the alias is about groups (GroupNorm's usual setting), else 1.
DEFAULT_GROUPS = {"group": 32, "batch_group": 32}


@dataclass(frozen=True)
class Spec:
    """A parsed scope for an input of a given rank.

    ``layout`` is the input's axis letters (``"NCHW"``); ``letters`` the reduced subset in layout
    order; ``num_groups`` the channel groups (1 unless ``C`` is reduced); ``sample_groups`` the
    groups of contiguous samples (1 unless ``N`` is reduced).
    """

    layout: str
    letters: str
    num_groups: int
    sample_groups: int = 1

    @property
    def reduces_n(self) -> bool:
        return "N" in self.letters

    @property
    def reduces_c(self) -> bool:
        return "C" in self.letters

    @property
    def spatial(self) -> str:
        return self.layout[2:]

    def reduces_spatial(self, i: int) -> bool:
        return self.spatial[i] in self.letters

    @property
    def allows_running_stats(self) -> bool:
        """Running statistics need a scope over N and every spatial axis (BatchNorm-like)."""
        return self.reduces_n and all(ch in self.letters for ch in self.spatial)

    def logical_axes(self, shape) -> list[tuple[str, int, bool]]:
        """``(name, size, reduced)`` for N, G, Cg and each spatial axis, in that order.

        With ``sample_groups = S > 1`` an ``("S", S, False)`` axis comes first and N's size is
        ``N / S``: axis ``S`` numbers the groups of samples, ``N`` the samples within a group.
        """
        n, c = shape[0], shape[1]
        g, s = self.num_groups, self.sample_groups
        axes = [("S", s, False)] if s > 1 else []
        axes += [("N", n // s, self.reduces_n), ("G", g, False), ("Cg", c // g, self.reduces_c)]
        for i, ch in enumerate(self.spatial):
            axes.append((ch, shape[2 + i], ch in self.letters))
        return axes

    def logical_shape(self, shape) -> tuple[int, ...]:
        """x's shape viewed as the logical axes (a reshape of a contiguous x)."""
        return tuple(size for _, size, _ in self.logical_axes(shape))

    def stat_shape(self, shape) -> tuple[int, ...]:
        """Shape of the per-statistic tensors: the kept logical axes in logical order, with
        G standing for the channel axis when C is reduced (e.g. (N, G) for group, (C,) for batch).
        Sample groups come first: (S, C) for batch, (S, G) for batch_group, (S, C, W) for "NH"."""
        return tuple(size for name, size, red in self.logical_axes(shape)
                     if not red and not (name == "G" and not self.reduces_c))

    def running_shape(self, shape) -> tuple[int, ...]:
        """Shape of running statistics: ``stat_shape`` without the sample-group axis (one
        running value per channel, or per group when C is reduced, whatever S is)."""
        st = self.stat_shape(shape)
        return st[1:] if self.sample_groups > 1 else st

    def count(self, shape) -> int:
        """Number of elements that one statistic is taken over."""
        m = 1
        for _, size, red in self.logical_axes(shape):
            if red:
                m *= size
        return m


def alias_letters(alias: str, layout: str) -> str:
    spatial = layout[2:]
    return {
        "batch": "N" + spatial,
        "layer": "C" + spatial,
        "instance": spatial,
        "group": "C" + spatial,
        "batch_group": "NC" + spatial,
        "positional": "C",
    }[alias]


def parse(scope, ndim: int, num_groups=None, channels: int | None = None, sample_groups=1,
          batch: int | None = None) -> Spec:
    """Parse ``scope`` for an input of rank ``ndim``; raise ValueError/TypeError naming the argument.

    ``channels`` and ``batch`` (x's C and N, when known) are checked against the groups."""
    if ndim not in LAYOUTS:
        raise ValueError(
            f"x must have shape (N, C, *spatial) with 0 to 3 spatial dims (2-D to 5-D); got {ndim}-D"
        )
    layout = LAYOUTS[ndim]
    if not isinstance(scope, str):
        raise TypeError(f"scope must be a string (an alias or axis letters), got {type(scope).__name__}")
    key = scope.strip()
    if key.lower() in ALIASES:
        alias = key.lower()
        letters = alias_letters(alias, layout)
        if not letters:
            raise ValueError(
                f"scope={scope!r} reduces the spatial axes, but x is {ndim}-D ({layout}) and has none"
            )
        default_groups = DEFAULT_GROUPS.get(alias, 1)
    else:
        if not key:
            raise ValueError("scope must not be empty: name an alias or at least one axis letter")
        if not key.isalpha():
            raise ValueError(
                f"scope={scope!r} is not an alias ({', '.join(ALIASES)}) nor axis letters of {layout}"
            )
        letters_in = key.upper()
        seen = set()
        for ch in letters_in:
            if ch not in layout:
                raise ValueError(
                    f"scope={scope!r}: letter {ch!r} is not an axis of a {ndim}-D input "
                    f"(layout {layout}); aliases are {', '.join(ALIASES)}"
                )
            if ch in seen:
                raise ValueError(f"scope={scope!r}: letter {ch!r} is repeated")
            seen.add(ch)
        letters = "".join(ch for ch in layout if ch in seen)
        default_groups = 1
    if num_groups is None:
        groups = default_groups if "C" in letters else 1
    else:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int):
            raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
        if "C" not in letters:
            raise ValueError(
                f"num_groups={num_groups} splits the channel axis, but scope={scope!r} "
                f"(axes {letters}) does not reduce C"
            )
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        groups = num_groups
    if channels is not None and channels % groups != 0:
        raise ValueError(
            f"num_groups={groups} does not divide the {channels} channels of x "
            f"(scope={scope!r}); pass num_groups= a divisor of C"
        )
    samples = _check_sample_groups(sample_groups, scope, letters, batch)
    return Spec(layout=layout, letters=letters, num_groups=groups, sample_groups=samples)


def _check_sample_groups(sample_groups, scope, letters: str, batch: int | None) -> int:
    """S = 1 is every scope's default; S > 1 needs N in the scope and must divide N."""
    if isinstance(sample_groups, bool) or not isinstance(sample_groups, int):
        raise TypeError(f"sample_groups must be an int, got {type(sample_groups).__name__}")
    if sample_groups < 1:
        raise ValueError(f"sample_groups must be >= 1, got {sample_groups}")
    if sample_groups > 1 and "N" not in letters:
        raise ValueError(
            f"sample_groups={sample_groups} splits the batch axis, but scope={scope!r} "
            f"(axes {letters}) does not reduce N")
    if batch is not None and batch % sample_groups != 0:
        raise ValueError(
            f"sample_groups={sample_groups} does not divide the batch of {batch} samples of x "
            f"(scope={scope!r}); pass sample_groups= a divisor of N")
    return sample_groups
