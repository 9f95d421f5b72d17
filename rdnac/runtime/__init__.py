"""The lean runtime: loads a plan and generates. Imports nothing from rdnac.compiler."""
