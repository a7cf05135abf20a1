"""Score networks. Networks know nothing about the SDE; :class:`fpe_lab.model.ScoreModel` does."""
