"""Running a federation: the one pipeline both `fedssl simulate` and `fedssl server start` go through
(fedssl.run.pipeline), the simulation launcher (fedssl.run.simulation) and the Flower process helpers
both launchers and the site agent use (fedssl.run.flower_runtime). Import the submodules directly."""
