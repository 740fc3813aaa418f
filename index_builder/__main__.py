"""Entry point: ``python -m index_builder`` (and ``torchrun -m index_builder build …``)."""

from .cli import main

raise SystemExit(main())
