"""What each CLI command does, as library functions a notebook can call too (nothing here prints).

* ``visualize.py``  -- every method on fixed or given images, PNG + sidecar + TensorBoard
* ``evaluate.py``   -- test metrics, confusion matrix, confidently wrong images, the faithfulness table
* ``report.py``     -- one self-contained HTML page of a run
* ``summary.py``    -- the layer table of a config's or a run's model
"""
