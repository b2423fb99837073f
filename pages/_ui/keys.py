"""Every ``st.session_state`` key the dashboard itself reads or writes (``ll_*``), in one place.

Widget keys (``key="pr_ratio"`` and the like) stay with their widgets in the pages.
"""

SS_INIT = "ll_init"  # True once init_session has read the share link
SS_REQUESTED = "ll_requested"  # AnalysisSettings asked for (share link, last Analyze), maybe not run yet
SS_JOB = "ll_analysis_job"  # jobs.AnalysisJob: the session's latest analysis (its thread outlives a page change)
SS_CANCELLED = "ll_cancelled"  # the user pressed Cancel during an analysis
SS_SETTINGS = "ll_settings"  # AnalysisSettings of the report on screen
SS_REPORT = "ll_report"  # LayerReport on screen
SS_MODEL_INFO = "ll_model_info"  # ModelInfo.to_dict() of the report's model
SS_UPLOAD = "ll_upload"  # {"name", "sha", "path"}: this session's uploaded data file
SS_PLAN_SETTINGS = "ll_plan_settings"  # PlanSettings (Prune page)
SS_PLAN_FROM_URL = "ll_plan_from_url"  # the plan settings came from a share link
SS_PLAN = "ll_plan"  # the PrunePlan on screen (None while the selection is invalid)
SS_PLAN_ERROR = "ll_plan_error"  # True while the Prune selection gives no valid plan (views cleared, Apply off)
SS_PRUNED = "ll_pruned"  # {"plan_json", "plan", "model", "quick", "original", "prompt"}: this session's pruned model
SS_APPLIED = "ll_applied"  # last 3 applied plans' quick numbers, newest first (widgets.remember_applied)
SS_SAVED_MODEL = "ll_saved_model"  # folder of the pruned model last saved on the Export page
SS_SWEEP = "ll_sweep_frame"  # (sweep key, frame) of the sweep on screen
SS_SWEEP_STOPPED = "ll_sweep_stopped"  # the Stop button was pressed during a sweep
SS_SWEEP_RUNNING = "ll_sweep_running"  # threading.Event, set once run_sweep's script run has fully ended
SS_SWEEP_REQUESTED = "ll_sweep_requested"  # SweepSettings of a share link: the Evaluate widgets' defaults
SS_SWEEP_SETTINGS = "ll_sweep_settings"  # SweepSettings on the Evaluate page (the URL carries them)
SS_SWEEP_PARTIAL = "ll_sweep_partial"  # {sweep key: finished points of a stopped sweep}, see sweeping.run_sweep
SS_HEAL_JOB = "ll_heal_job"  # pages/_ui/healing.HealJob: the session's latest heal (its thread outlives a page change)
SS_HEALED = "ll_healed"  # {"plan_json", "model_key", "model", "record", "numbers", ...}: the healed applied plan
