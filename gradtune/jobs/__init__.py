"""Config -> Job (model, objective, data) for each run type, registered in one table
(``registry.BUILDERS``), and reloading a finished run (``reload``)."""
