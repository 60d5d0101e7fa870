"""The embedded demo: a tiny Lance trained on procedural scenes (`lance_jax.data.synthetic`), scored per task
(`evaluate`) and shown as a report page and contact sheet (`report`)."""
