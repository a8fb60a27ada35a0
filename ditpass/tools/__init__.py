"""The tools that show and drive the flow: `explain` and `render` (what was done, as text and as a
picture), and the ``ditpass`` command (`cli`: ``inspect``, ``run`` (`verify`), ``generate``)."""
